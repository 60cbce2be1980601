"""`tiny-warm`: the tiny Qwen2-VL pretrained briefly, so that it answers grid questions.

The random `tiny` model answers every question the same way, so no run on it can show what
training does. `tiny-warm` is the same architecture (Qwen2-VL: 12 LM layers of width 64, an
8-block vision tower) with every weight pretrained for about 600 steps on grid questions about
three objects of its own (`PRETRAIN_OBJECTS`), which the demo never finetunes or evaluates on. It
answers in the expected format ("left<|im_end|>"), is nearly always right on its own objects and
clearly above chance, below perfect, on the demo's objects (the same colours, other shapes). It is
a sandbox for checking the pipeline end to end, not a model of the paper's result.

Three choices make this learnable in a couple of CPU minutes; without them the same loop stays at
chance (the loss flat at ln 2 per answer) for a thousand steps:
- M-RoPE base 4 instead of 10,000, with the rotary pairs split (2, 3, 3) over (time, height,
  width): at base 10,000 the height and width sections of a 16-dim head get the lowest
  frequencies (<= 0.003 rad per cell), and Qwen2-VL's visual tokens carry no position of their
  own, so the LM cannot tell where an image token is;
- initial weights with std 0.3 instead of 0.02: at 0.02 every attention score starts near 0, and
  uniform attention averages positions away;
- a curriculum: first obj2 always the same object in a middle cell and obj1 in a corner (obj1's
  cell alone gives the answer), then obj2 anywhere (both cells must be read), then obj2 one of 2,
  then of all 3 objects (the model must also tell which object the question names). A stage
  begins once the last one is learnt (its loss near 0), not at a fixed step: when the model
  leaves a plateau varied from 70 to 350 steps between seeds, and fixed schedules moved on too
  early.
Everything is seeded: the same machine builds the same weights, but another CPU's float
arithmetic (other SIMD kernels, another summation order) leaves a plateau at another step and
ends at another model. So the built weights ship in `weights/tiny-warm-v1/` and this script is
their recipe, not something that runs on a user's machine:

    python tiny_warm.py --overwrite          # rebuild weights/tiny-warm-v1/ (about 2 CPU minutes)
    python tiny_warm.py --out /tmp/warm      # build elsewhere, e.g. to compare with the shipped one
"""
import json
import math
import random
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Qwen2VLForConditionalGeneration

import data
import eval_coco
import models
import render
import tiny_models

# Not built-in objects (data.BUILTIN_OBJECT_NAMES): the colours of the demo's objects (red circle,
# blue square, green triangle) in other shapes. The demo finetunes and evaluates on built-in
# objects only, which tiny-warm knows by colour but has never seen in these shapes.
PRETRAIN_OBJECTS = ("red heart", "blue hexagon", "green pentagon")
NEW_OBJECTS = ("red circle", "blue square", "green triangle")  # the demo's; recorded at build time
# The curriculum, one stage after another: (obj2 is one of the first K objects, easy layouts).
# Easy layouts put obj2 in the middle 2 x 2 cells and obj1 in a corner, so obj1's cell alone
# answers both questions. A stage ends once the mean loss of its last ADVANCE_WINDOW steps is
# under ADVANCE_LOSS (chance is ln 2 / 2 = 0.35: the loss averages the answer and the
# end-of-turn token); after the last stage come FINAL_STEPS more.
CURRICULUM = ((1, True), (1, False), (2, False), (3, False))
ADVANCE_LOSS = 0.1
ADVANCE_WINDOW = 20
FINAL_STEPS = 100
MAX_STEPS = 1500  # a safety stop
BATCH_SIZE = 16
LR = 3e-3
WARMUP_STEPS = 50
DECAY_STEPS = 600
CELL = 28  # grid cell px: 112 px images, one merged visual token per cell
OBJECT_SIZE = 124  # px at the 224 px reference cell
ROPE_THETA = 4.0
MROPE_SECTION = [2, 3, 3]
INIT_STD = 0.3
SEED = 0


def warm_config(tokenizer):
    """The tiny Qwen2-VL config with the rotary base, sections and init scale above."""
    config = tiny_models.tiny_qwen2vl_config(tokenizer)
    config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": ROPE_THETA,
                                          "mrope_section": list(MROPE_SECTION)}
    config.initializer_range = config.text_config.initializer_range = INIT_STD
    config.vision_config.initializer_range = INIT_STD
    return config


class GridQuestions:
    """Grid questions drawn on the fly, in memory: two objects in two random cells, both question
    types where they apply, worded in one of `styles` (tiny-warm learns the paper protocol's
    bare names, the demo's wording)."""

    def __init__(self, objects=None, cell=CELL, size=OBJECT_SIZE, styles=("paper",)):
        self.styles = styles
        self.objects = list(objects or PRETRAIN_OBJECTS)
        self.cell, self.size = cell, size
        self.renders = {}
        for name in self.objects:
            colour, shape = name.split(" ", 1)
            self.renders[name] = render.draw_object(colour, shape, render_size=64)
        self._fitted = {}

    def samples(self, rng, n, obj2_from=None, easy=False):
        """`n` questions from random layouts; obj2 is one of the first `obj2_from` objects; `easy`
        puts obj2 in the middle 2 x 2 cells and obj1 in a corner."""
        cells = [(col, row) for col in range(data.GRID) for row in range(data.GRID)]
        out = []
        while len(out) < n:
            obj2 = rng.choice(self.objects[:obj2_from or len(self.objects)])
            obj1 = rng.choice([o for o in self.objects if o != obj2])
            cell1, cell2 = rng.sample(cells, 2)
            if easy:
                cell1 = (rng.choice((0, data.GRID - 1)), rng.choice((0, data.GRID - 1)))
                cell2 = (rng.choice((1, 2)), rng.choice((1, 2)))
            layout = data.GridLayout(obj1, cell1, obj2, cell2, self.size)
            image = render.render_grid_image(layout, self.renders, cell=self.cell, _fitted=self._fitted)
            path = f"<tiny-warm pretraining {data.format_grid_name(layout)}>"
            for qtype, answer in data.questions_for_layout(layout):
                style = rng.choice(self.styles)
                out.append(data.sample_record(path, qtype, answer, obj1, obj2, style, image=image,
                                              cell1=cell1, cell2=cell2, size=self.size))
        return out[:n]


def pretrain(model, processor, adapter, progress=True):
    """Train every weight of `model` through the curriculum. Returns (the loss of each step, the
    step at which each stage of CURRICULUM began, the step at which the final stage began or None
    when MAX_STEPS came first)."""
    collate = data.VLMCollator(processor, adapter)
    questions = GridQuestions()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model.train()
    losses, stage_starts, final_start = [], [0], None
    bar = tqdm(total=None, desc="pretraining tiny-warm", disable=not progress,
               mininterval=1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
    for step in range(MAX_STEPS):
        stage = len(stage_starts) - 1
        if final_start is not None and step - final_start >= FINAL_STEPS:
            break
        # Warm-up, then a linear decay to LR / 10 at DECAY_STEPS (a lower rate lets the later
        # stages settle), then a linear decay to 0 over the final stage.
        lr = LR * min(1.0, (step + 1) / WARMUP_STEPS) * max(0.1, 1.0 - 0.9 * step / DECAY_STEPS)
        if final_start is not None:
            lr *= 1.0 - (step - final_start) / FINAL_STEPS
        for group in optimizer.param_groups:
            group["lr"] = lr
        rng = random.Random(f"tiny-warm:{SEED}:{step}")
        obj2_from, easy = CURRICULUM[stage]
        batch = collate(questions.samples(rng, BATCH_SIZE, obj2_from=obj2_from, easy=easy))
        inputs, _, _ = data.split_batch(batch, "cpu")
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"tiny-warm pretraining diverged at step {step} (loss {losses[-1]})")
        window = losses[max(stage_starts[-1], step + 1 - ADVANCE_WINDOW):]
        if final_start is None and len(window) == ADVANCE_WINDOW and sum(window) / ADVANCE_WINDOW < ADVANCE_LOSS:
            if stage + 1 < len(CURRICULUM):
                stage_starts.append(step + 1)
            else:
                final_start = step + 1
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", stage=len(stage_starts) - 1, refresh=False)
    bar.close()
    model.eval()
    return losses, stage_starts, final_start


def option_accuracy(model, processor, adapter, samples):
    """Score-mode accuracy (the option words' log-probabilities at the answer position)."""
    return eval_coco.evaluate(model, processor, adapter, samples, 32, "score", progress=False)[0]["accuracy"]


def build_tiny_warm(out_dir, progress=True):
    """Build, pretrain and save tiny-warm into `out_dir` (with `pretraining.json` and the
    `SHA256SUMS` that loading checks)."""
    tokenizer = tiny_models.build_qwen_tokenizer()
    config = warm_config(tokenizer)
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config)
    processor = tiny_models._qwen_processor(tokenizer)
    adapter = models.adapter_for(model)
    processor.tokenizer.padding_side = adapter.padding_side
    losses, stage_starts, final_start = pretrain(model, processor, adapter, progress=progress)
    if final_start is None:
        print(f"warning: tiny-warm pretraining stopped at {MAX_STEPS} steps before its last stage "
              f"(stages began at steps {stage_starts}); it may answer at chance", flush=True)

    check = GridQuestions().samples(random.Random(f"tiny-warm:{SEED}:check"), 128)
    new = GridQuestions(objects=NEW_OBJECTS).samples(random.Random(f"tiny-warm:{SEED}:new"), 128)
    record = {
        "objects": list(PRETRAIN_OBJECTS), "steps": len(losses), "curriculum": [list(stage) for stage in CURRICULUM],
        "stage_starts": stage_starts, "final_stage_start": final_start,
        "batch_size": BATCH_SIZE, "lr": LR, "rope_theta": ROPE_THETA, "mrope_section": MROPE_SECTION,
        "init_std": INIT_STD, "seed": SEED, "loss_first": losses[0], "loss_last_50_mean": sum(losses[-50:]) / len(losses[-50:]),
        "accuracy_pretraining_objects_new_layouts": option_accuracy(model, processor, adapter, check),
        "new_objects": list(NEW_OBJECTS),
        "accuracy_new_objects": option_accuracy(model, processor, adapter, new),
    }
    tiny_models._save(model, processor, out_dir, config.text_config.eos_token_id, config.text_config.pad_token_id)
    (Path(out_dir) / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
    tiny_models.write_manifest(out_dir)
    return record


def main(argv=None):
    out, record = tiny_models.rebuild_shipped("tiny-warm", build_tiny_warm, __doc__, argv)
    print(f"wrote {out}: {record['steps']} steps; accuracy on its own objects (new layouts) "
          f"{record['accuracy_pretraining_objects_new_layouts']:.3f}, on {', '.join(NEW_OBJECTS)} "
          f"{record['accuracy_new_objects']:.3f}")
    return record

if __name__ == "__main__":
    main()
