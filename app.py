"""Launch the FlexiGPT Studio explorer: ``python app.py`` (host/port from GRADIO_SERVER_NAME/PORT)."""
import logging

from app.ui import build_demo, launch_options, queue_options

demo = build_demo()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    demo.queue(**queue_options()).launch(**launch_options())
