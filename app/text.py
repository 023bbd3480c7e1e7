"""Plain-language copy for the explorer: intro, per-tab help and a glossary for students."""
from __future__ import annotations

INTRO = """
# FlexiGPT Studio
Make a language model **shallower** by removing the transformer blocks that matter least, then
see what that costs. FlexiGPT ([Smith et al., NAACL 2025](https://arxiv.org/abs/2501.14713)) does
not simply delete a pruned block: it puts a *replacement* at the same depth that **reuses the
weights of a kept block (its donor)** plus a small trainable correction (a LoRA adapter), so the
model stores fewer parameters but keeps its depth. Where no kept block helps (the share-error
analysis measures it), the replacement keeps only its own small low-rank weights: no donor, and
cheaper to run. Work left to right through the tabs.
All block ids are **0-based**: the first block is block 0.
"""

GLOSSARY = """
**Block**: one decoder layer of the base model (attention + MLP). Hugging Face calls it a "layer".
**Slot**: a position in the new model's stack. A FlexiGPT model has one slot per base block;
a dropped model has fewer; an extended model has more.
**Donor**: the kept base block whose weight tensors a replacement slot reuses. Several slots may share
one donor; its weights are stored once.
**Adapter**: the small per-slot LoRA correction (rank *r*) that a replacement slot adds on top of its
donor's weights. Only adapters (and small norms) are trained during recovery.
**Plan**: the recipe: which block each slot runs, the method and the adapter rank. It is a small JSON
file you can download, edit and upload.
"""

MODEL_HELP = """
Pick **default** (SmolLM2-135M-Instruct, shipped with the app, no download) or a local model folder
or a cached Hugging Face id. Calibration data is the text used to measure the blocks:
**default** is Python's built-in documentation text; you can give a `.txt` / `.jsonl` path instead.
The last 10 % of the text is always held out for perplexity and never used for calibration or training.
"""

SCORES_HELP = {
    "bi": """
**Block Influence (BI)** asks: *how much does this block change the hidden state?* For every token we
compare the vector entering the block with the vector leaving it (cosine similarity) and report
`1 − mean cosine`. A block with BI near 0 barely rotates the residual stream, so removing it should
hurt little. ShortGPT prunes the lowest-BI blocks; so does FlexiGPT. BI is only a proxy: where it is
computed, the **loss increase when the block is removed** is the measured effect (lower = safer).
""",
    "angular": """
**Angular distance** generalises BI to *runs* of blocks: for a span of *n* consecutive blocks starting
at block *l*, it is the angle between the hidden state entering block *l* and the one leaving block
*l+n−1*, scaled to 0..1 (`arccos(cos)/π`). Dark cells are contiguous runs that could be cut together;
the white × marks the best start for each span length (Gromov et al., PruneMe).
""",
    "gates": """
**FoldGPT gate** ([Liu et al., 2024](https://arxiv.org/abs/2407.00928)): every block gets a learnable
dial between 0 (skipped) and 1 (fully on), and a few training steps on the calibration text, with a
push to switch about a *ratio* of the blocks off, turn down the blocks the model can do without
**given the others**, so a low gate means "removable", judged jointly rather than one block at a time like BI.
""",
    "similarity": """
**Similarity** compares the *outputs* of two blocks (mean token cosine). A dark square along the
diagonal means neighbouring blocks write almost the same state, i.e. depth that adds little.
""",
}

SHARE_HELP = """
**Share error** asks: *if a pruned block reused a kept block's weights (its donor) plus a rank-r
correction, how far would it be from the original?* For each weight matrix we take the difference
`D = W_pruned − W_donor` and measure what a rank-r adapter cannot capture: `‖D − SVD_r(D)‖`.
Rows are pruned candidates, columns are possible donors; lower is better and the circle marks the
**suggested donor** (the lowest error among kept blocks).

* **absolute**: summed over matrices, in weight units (large matrices dominate);
* **relative**: each matrix's error divided by its own norm, then averaged (1.41 ≈ unrelated weights);
* **paper**: the formula as printed in the paper (on the rank-r reconstructions).

On small models different blocks' weights are nearly unrelated, so the correction barely helps:
that is why FlexiGPT starts each replacement as an (almost) identity with a tiny output scale.
"""

PLAN_HELP = """
The ratio slider proposes a plan: prune the lowest-BI blocks and give each its suggested donor, or
**no donor** where the share error (tab 3) finds the block's own low-rank fit better, and everywhere
before the share error is computed (slots without donors won every benchmark we ran). Then edit it by hand: pick a block, **keep** or **prune** it and choose the **donor** of a pruned
block; or upload a `plan.json`. Every edit is checked at once (a donor must be a kept block). Methods: **FlexiGPT** (replacement slots share a donor + adapter),
**drop** (ShortGPT: the blocks are removed), **extend** (copy blocks to make the model deeper),
**FoldGPT** (remove the lowest-gated blocks, or the lowest-BI ones until gates are trained in tab 2;
then every *group size* consecutive kept blocks run the first one's weights, each keeping its own
small norms, which recovery re-adapts). **Align donors** lines each donor's neurons and heads up with
the pruned block before the adapter is fitted: same size and speed, a closer starting point.
"""

BUILD_HELP = """
**Build** applies the plan to a copy of the model (the base model is never changed), then measures
a **quick preview perplexity** on a few held-out windows. **Fit slots** (FlexiGPT builds) trains each
replacement slot alone, on a few calibration windows, to reproduce the block it replaces, and draws
one bar per slot: the share (R²) of that block's update the slot reproduces, where 0 is a plain drop
and 1 an exact stand-in. **Recover** then trains only the new adapters end to end and draws the loss
live; **Stop** ends it after the current step. It starts at the recovery the benchmarks measure (100
steps x 4 windows x 256 tokens: about 7 minutes on 2 CPU cores, plus a one-time wait on a fresh
server while the original model writes the chat replies it learns from). Fewer steps finish sooner
and chat worse: 20 steps x 2 windows x 128 tokens answered 5 of 73 fidelity prompts, 100 x 4 x 256
answered 20.
"""

COMPARE_HELP = """
Every perplexity is shown with its **protocol** (data, split, windows, sequence length, BOS):
numbers measured with different protocols are not comparable. Stored parameters count each shared
tensor once; run cost counts the parameters each forward pass goes through. **Measure speed** times
every model the way a chat runs it (eval mode, interleaved with the original round by round, median
of 5): **forward ms**, one forward pass over a 128-token prompt (with its ratio to the original's),
and greedy **tokens/s** over 16 new tokens, with the **speed-up** over the original (above x1.00 is
faster). On a shared machine differences under about 10 % are noise.
"""

CHAT_HELP = """
The same message goes to the **original** model and the **built** model; both answers stream side by
side using the model's chat template. A small model pruned without much recovery will often ramble:
that is the honest result. **Speculative decoding** answers with both models exactly as plain
greedy decoding would, but lets a cheaper copy of each model (int8 weights, a shorter vocabulary,
some sub-layers skipped: whichever decoded fastest on this machine, searched once and cached)
guess a few tokens that the full model then checks in one pass;
it needs temperature 0 and shows how many guesses were accepted.
**Fidelity check** asks both models a fixed set of short questions with known answers and reports
the share each answers correctly, how often the built model's first tokens equal the original's,
and the prompts the built model loses.
"""

EXPORT_HELP = """
**Compact** export stores every kept block once plus the adapters and `plan.json` (small; loads with
FlexiGPT Studio). **Merged** export writes a standard Hugging Face checkpoint (each slot materialised,
larger; loads with `AutoModelForCausalLM`). A merged checkpoint needs replacement slots whose output
norm is the linear **scale** (choose it in the Plan tab before building): the paper's LayerNorm
cannot be folded into plain weights.
"""
