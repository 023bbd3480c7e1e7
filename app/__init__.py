"""The FlexiGPT Studio explorer (Gradio). ``app/ui.py:build_demo`` builds it; ``app.py`` launches it.

This file must exist: it makes ``app`` a regular package, which takes precedence over the
``app.py`` script of the same name: without it, ``from app.ui import ...`` inside ``app.py``
fails with "'app' is not a package".
"""
