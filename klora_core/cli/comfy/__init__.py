"""A headless ComfyUI: start ``main.py`` as a subprocess (:mod:`.server`), talk to its HTTP API
(:mod:`.client`) and follow its websocket events (:mod:`.events`).  Standard library only."""
