"""Launch the FlexiGPT Studio explorer: ``python app.py`` (host/port from GRADIO_SERVER_NAME/PORT)."""
import logging

from app.ui import build_demo, launch_options

demo = build_demo()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    demo.queue(default_concurrency_limit=1).launch(**launch_options())
