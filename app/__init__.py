"""The FlexiGPT Studio explorer (Gradio). ``app/ui.py:build_demo`` builds it; ``app.py`` launches it.

This file must exist: it makes ``app`` a regular package, which takes precedence over the
``app.py`` script of the same name (see the house style, "name clash").
"""
