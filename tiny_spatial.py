"""`tiny-spatial`: tiny-warm taught a position code that every object shares, so that the spatial-ID
method can be tried end to end on a CPU (the sandbox of issue 19).

tiny-warm answers grid questions but holds no universal spatial IDs (docs/spatial-ids.md). This
recipe continues training all of its weights on two losses at once:
- the relation questions about 48 objects (8 colours x 8 shapes, less the 16 held out: those whose
  colour index + shape index is a multiple of 4), pairs always of two colours;
- the spatial-ID loss itself at LM layer 11, at the moving object's last name token, against
  fixed planted IDs: ID(col, row) = (col - 1.5) u + (row - 1.5) v, u and v orthonormal and random.
  Its batches keep obj1 in one cell while obj2 takes the 15 others; half ask the training question,
  half the paper recipe's query ("Is {b} to the left or right of {a}?", b the moving object), so
  that IDs derived by either recipe find the code.
Three phases, each with a fresh optimiser and schedule: white backgrounds only, then half and a
quarter of the images on the extraction layout's black canvas (a model that has only seen white
shows its code on white images alone). The built weights ship in `weights/tiny-spatial-v1/`; as
with tiny-warm, another CPU's arithmetic would train another model, so this script is the record
of how they were made:

    python tiny_spatial.py --overwrite        # rebuild weights/tiny-spatial-v1/ (about 30 CPU minutes)
"""
import json
import random
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

import data
import eval_coco
import models
import render
import spatial_loss as sl
import tiny_models
from derive_spatial_ids import PAPER_QUERY
from lm_loss import last_hidden_state

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "cyan")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "heart", "hexagon")
HELD_OUT = tuple(sorted(f"{c} {s}" for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES) if (i + j) % 4 == 0))
TRAIN_OBJECTS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in HELD_OUT)
PHASES = ((800, 0.0), (1000, 0.5), (2000, 0.25))  # (steps, share of images on a black canvas)
LAYER = 11
LR = 1e-3
WARMUP_STEPS = 50
CODE_WEIGHT = 1.0
RELATION_BATCH = 16
SIZE = 124
CODE_SEED = 19
CELL = 28  # px, as tiny-warm's: 112 px images, one merged visual token per cell
CELLS = [(c, r) for c in range(data.GRID) for r in range(data.GRID)]


class Objects:
    """The objects' renders (64 px, as tiny-warm's pretraining drew them) and the cache of their
    scaled copies."""

    def __init__(self, objects):
        self.objects = list(objects)
        self.renders = {name: render.draw_object(*name.split(" ", 1), render_size=64) for name in self.objects}
        self._fitted = {}


def planted_ids(hidden_size):
    """{(col, row, size): the planted ID}: a linear grid code on two orthonormal random directions."""
    g = torch.Generator().manual_seed(CODE_SEED)
    u, v = torch.randn(hidden_size, generator=g), torch.randn(hidden_size, generator=g)
    u = u / u.norm()
    v = v - (v @ u) * u
    v = v / v.norm()
    return {(c, r, SIZE): (c - 1.5) * u + (r - 1.5) * v for c, r in CELLS}


def two_colours(rng, objects):
    while True:
        a, b = rng.sample(objects, 2)
        if a.split()[0] != b.split()[0]:
            return a, b


def draw(layout, objects, black):
    """The layout on white, or on the extraction layout's black canvas, as RGB."""
    return render.render_grid_image(layout, objects.renders, cell=CELL, _fitted=objects._fitted,
                                    transparent=black).convert("RGB")


def on_black(rng, black_share):
    """Whether the next image goes on black (no random draw when none does, as the build ran)."""
    return black_share > 0 and rng.random() < black_share


def relation_questions(rng, questions, n=RELATION_BATCH, black_share=0.0):
    """n relation questions (paper wording) about random layouts of two objects of two colours."""
    out = []
    while len(out) < n:
        obj1, obj2 = two_colours(rng, questions.objects)
        cell1, cell2 = rng.sample(CELLS, 2)
        layout = data.GridLayout(obj1, cell1, obj2, cell2, SIZE)
        image = draw(layout, questions, on_black(rng, black_share))
        for qtype, answer in data.questions_for_layout(layout):
            out.append(data.sample_record(f"<{data.format_grid_name(layout)}>", qtype, answer, obj1, obj2, "paper",
                                          image=image, cell1=cell1, cell2=cell2, size=SIZE))
    return out[:n]


def code_group(rng, questions, black_share=0.0):
    """obj1 fixed in one cell, obj2 in each of the other 15; asked as the training question or as
    the paper recipe's query, whose subject b is the moving object."""
    obj1, obj2 = two_colours(rng, questions.objects)
    cell1 = (rng.randrange(data.GRID), rng.randrange(data.GRID))
    paper_query = rng.random() < 0.5
    black = on_black(rng, black_share)
    qtype = rng.choice(["lr", "ab"])
    out = []
    for cell2 in [c for c in CELLS if c != cell1]:
        layout = data.GridLayout(obj1, cell1, obj2, cell2, SIZE)
        image = draw(layout, questions, black)
        path = f"<{data.format_grid_name(layout)}>"
        if paper_query:
            out.append({"image_path": path, "question": PAPER_QUERY.format(a=obj1, b=obj2), "obj1": obj1, "obj2": obj2,
                        "obj2_span": (3, 3 + len(obj2)), "options": data.OPTIONS["lr"], "answer": "", "image": image,
                        "cell1": cell1, "cell2": cell2, "size": SIZE})
        else:
            out.append(data.sample_record(path, qtype, "left", obj1, obj2, "paper", image=image, cell1=cell1,
                                          cell2=cell2, size=SIZE))
    return out


def relation_accuracy(model, processor, adapter, objects, seed, n=128, black_share=0.0):
    """Score-mode accuracy on n relation questions about `objects` (seeded)."""
    samples = relation_questions(random.Random(seed), Objects(objects), n, black_share)
    return eval_coco.evaluate(model, processor, adapter, samples, 32, "score", progress=False)[0]["accuracy"]


def train_phase(model, processor, adapter, steps, black_share, progress=True):
    """One phase: a fresh AdamW, warm-up then a linear decay to 0; returns the (relation, code) losses."""
    collate = data.VLMCollator(processor, adapter)
    prompts = data.VLMCollator(processor, adapter, with_answer=False)
    code_loss = sl.SpatialIDLoss(planted_ids(adapter.lm_hidden_size(model)))
    questions = Objects(TRAIN_OBJECTS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    bar = tqdm(range(steps), desc=f"tiny-spatial phase ({black_share:.0%} black)", disable=not progress,
               mininterval=1 if sys.stderr.isatty() else 30)
    for step in bar:
        model.train()
        rng = random.Random(f"i19:{step}")
        for group in optimizer.param_groups:
            group["lr"] = LR * min(1, (step + 1) / WARMUP_STEPS) * (1 - step / steps)
        inputs, _, _ = data.split_batch(collate(relation_questions(rng, questions, black_share=black_share)), "cpu")
        relation = model(**inputs).loss
        batch, positions, cells = data.split_batch(prompts(code_group(rng, questions, black_share)), "cpu")
        with sl.capture_layer(model, adapter, LAYER) as captured:
            last_hidden_state(model, adapter, batch)
        code = code_loss(sl.gather_target_states(captured.states, positions), cells)
        (relation + CODE_WEIGHT * code).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((relation.item(), code.item()))
        bar.set_postfix(relation=f"{losses[-1][0]:.3f}", code=f"{losses[-1][1]:.3f}", refresh=False)
    model.eval()
    return losses


def build_tiny_spatial(out_dir, progress=True):
    """Train tiny-warm through PHASES and save it (with `pretraining.json` and SHA256SUMS)."""
    torch.manual_seed(0)
    model, processor, adapter = models.load_model_and_processor("tiny-warm")
    record = {"from": "tiny-warm", "phases": [list(p) for p in PHASES], "layer": LAYER, "lr": LR,
              "code_weight": CODE_WEIGHT, "train_objects": list(TRAIN_OBJECTS), "held_out_objects": list(HELD_OUT),
              "last_losses": []}
    for steps, black_share in PHASES:
        losses = train_phase(model, processor, adapter, steps, black_share, progress)
        record["last_losses"].append([sum(x) / len(x) for x in zip(*losses[-50:])])
    record["accuracy_held_out_white"] = relation_accuracy(model, processor, adapter, HELD_OUT, "held-out")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
    tiny_models.write_manifest(out_dir)
    return record


def main(argv=None):
    out, record = tiny_models.rebuild_shipped("tiny-spatial", build_tiny_spatial, __doc__, argv)
    print(f"wrote {out}: held-out relation accuracy {record['accuracy_held_out_white']:.3f}")
    return record

if __name__ == "__main__":
    main()
