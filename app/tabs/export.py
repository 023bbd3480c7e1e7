"""Tab 8: download the compact export (zip), the merged checkpoint (zip, when small enough), plan.json.

Everything is written inside the visitor's private folder (``Work.tmp_dir``) under a sanitised
name; the library's ``export_path`` refuses any name that could leave it. In public mode a
visitor keeps one export at a time (disk is shared).
"""
from __future__ import annotations

import os
import re
import shutil
import zipfile

import gradio as gr

from app import limits, text
from app.common import heavy, session_key, user_errors
from app.session import check_server_memory, work

MAX_MERGED_PARAMS = 600_000_000  # above this a merged zip is too large to hand out from a demo


def _slug(name: str) -> str:
    """A safe file-name stem: letters and digits joined by ``-`` (``../x`` -> ``x``), at most 60 characters."""
    return re.sub(r"[^A-Za-z0-9]+", "-", str(name)).strip("-").lower()[:60].strip("-") or "model"


def _get(key: str, name: str):
    b = work(key).builds.get(name) if isinstance(name, str) else None
    if b is None:
        raise ValueError(f"build {str(name)[:80]!r} not found among your builds; build a model in tab 5 first")
    return b


@user_errors
def on_export(name: str, kind: str, request: gr.Request = None, progress=gr.Progress()) -> tuple[str, str]:
    """Write the export of a build and zip it; returns (zip path, status)."""
    from flexigpt import export

    key = session_key(request)
    b = _get(key, name)
    if kind not in ("compact", "merged"):
        raise ValueError(f"export kind must be 'compact' or 'merged', got {kind!r}")
    if kind == "merged" and (b.params.get("run") or 0) > MAX_MERGED_PARAMS:
        raise ValueError(f"the merged checkpoint would hold {b.params['run']:,} parameters; the app hands out at most "
                         f"{MAX_MERGED_PARAMS:,} (use the CLI for larger models)")
    check_server_memory()
    w = work(key)
    root = w.file_path(f"{_slug(name)}-{kind}")
    if limits.current().public:  # one export per visitor at a time: drop the earlier ones
        for old in w.tmp_dir().glob("*.zip"):
            old.unlink(missing_ok=True)
    progress(0.2, desc=f"writing the {kind} export")
    save = export.save_compact if kind == "compact" else export.save_merged
    save(b.model, b.plan, b.tokenizer, root, overwrite=True)  # atomic: the old export or the new one
    progress(0.7, desc="zipping")
    archive = w.file_path(root.name + ".zip")
    part = w.file_path(f"{root.name}.zip.part")
    # stored, not deflated: weights barely compress and deflating 400 MB costs tens of seconds
    with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_STORED) as zf:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(root))
    os.replace(part, archive)  # a download never sees half a zip
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    files = sorted(p.name for p in root.iterdir())
    shutil.rmtree(root, ignore_errors=True)  # the zip is what is handed out
    return str(archive), f"**{kind}** export of **{name}**: {size / 1e6:.1f} MB unzipped ({', '.join(files)})."


@user_errors
def on_plan_file(name: str, request: gr.Request = None) -> str:
    """plan.json of a build, as a file path."""
    key = session_key(request)
    b = _get(key, name)
    path = work(key).file_path(f"{_slug(name)}-plan.json")
    path.write_text(b.plan.to_json())
    return str(path)


def on_export_compact(name: str, request: gr.Request = None, progress=gr.Progress()) -> tuple[str, str]:
    return on_export(name, "compact", request, progress)


def on_export_merged(name: str, request: gr.Request = None, progress=gr.Progress()) -> tuple[str, str]:
    return on_export(name, "merged", request, progress)


def on_builds(token=None, request: gr.Request = None):
    names = list(work(session_key(request)).builds)
    return gr.update(choices=names, value=names[0] if names else None)


def render(ctx) -> None:
    gr.Markdown(text.EXPORT_HELP)
    build = gr.Dropdown([], label="built model", elem_id="export-build")
    with gr.Row():
        compact = gr.Button("Export compact (zip)", variant="primary", elem_id="export-compact")
        merged = gr.Button("Export merged checkpoint (zip)", elem_id="export-merged")
        plan_btn = gr.Button("plan.json of this build", elem_id="export-plan")
    status = gr.Markdown("", elem_id="export-status")
    files = gr.File(label="download", elem_id="export-file")
    compact.click(on_export_compact, [build], [files, status], api_name="export_compact", **heavy())
    merged.click(on_export_merged, [build], [files, status], api_name="export_merged", **heavy())
    plan_btn.click(on_plan_file, [build], [files], queue=False, api_name="export_plan")
    ctx.builds_token.change(on_builds, [ctx.builds_token], [build], queue=False, api_name="export_builds")
