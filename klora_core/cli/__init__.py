"""The K-LoRA command line (``python -m klora_core``) and its headless ComfyUI runner.

Nothing in the algorithm package (``klora_core`` itself) imports from here:
this subpackage is the only place with argparse, subprocesses, HTTP and the
node ids of the graphs it posts.

- :mod:`.main`: ``map``, ``inspect`` and ``run`` subcommands
- :mod:`.run_command`, :mod:`.run_options`, :mod:`.run_graphs`: ``run``
- :mod:`.comfy`: start a real ComfyUI server, post prompts, follow events
- :mod:`.demo_pair`, :mod:`.demo_models`: generated demo LoRAs and models
"""
