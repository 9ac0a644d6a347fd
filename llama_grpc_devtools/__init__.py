"""Tools for running and developing llama-grpc, not part of any service: the whole stack in one
command (``stack``), a server as a child process (``process``, for the stack, tests and benches), and
random or converted checkpoints (``make_checkpoint``)."""
