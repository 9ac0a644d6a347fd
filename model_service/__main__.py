"""``python -m model_service``: see ``--help`` (every flag also reads ``LLAMA_MODEL_*``)."""

from model_service.server import main

if __name__ == "__main__":  # tensor-parallel ranks are spawned: they import this module without running it
    main()
