"""Architecture ablations (paper Table 3) and `--mode=ablate`.

Each variant is the command line's config with its architecture fields (FIG3: layer1,
conv_filters, fc_units, remove) set to the Fig. 3 model plus the variant's changes
(configs/ablations.py VARIANTS); unit counts are the paper's and scale with
`config.model.width` like every other layer. The mode trains every requested variant
with one budget (`config.ablate.epochs` and `.steps_per_epoch`; data, seed and learning
rate from the base config) in its own workdir `WORKDIR/ablate/<variant>/` through
`train.train_and_evaluate`, so an interrupted variant resumes, and a finished one (its
`ablate.json` written) is reused without retraining. Then it writes the Table 3-style
table:

  WORKDIR/ablate/table.md, table.json   rows: variants; columns: parameters, train and
                                        validation top-1/top-5 error, wall time
  WORKDIR/ablate/errors.png             the top-1 errors as bars (also TensorBoard:
                                        WORKDIR/ablate/logs/table)

Train error: the final model (checkpoints/model.keras) on the training split's center crops
(no dropout, no flips; the first `config.ablate.train_error_images` images). Validation
error: the 10-crop error of the variant's eval.json (as the paper's Table 2/3); the table
also shows the validation center-crop top-1 error, the like-for-like partner of the train
column. The last epoch's fit metrics (dropout on, random crops) are kept in table.json
("fit_top1_error").

Nothing is written outside WORKDIR/ablate/: the parent workdir's own run is untouched.
"""

from __future__ import annotations

import json
import os
import time

from zf_tf import outputs
from zf_tf.configs.ablations import VARIANTS, set_variant
from zf_tf.core import memory
from zf_tf.core import model as model_lib
from zf_tf.core.errors import UsageError
from zf_tf.pipelines import inputs
from zf_tf.training import evaluate, train, workdirs

MODE = "ablate"
RESULT_FILE = "ablate.json"  # in a variant's workdir once it is finished and scored

COLUMNS = (
    "Variant",
    "Table 3 row",
    "Parameters",
    "Train top-1 %",
    "Train top-5 %",
    "Val top-1 %",
    "Val top-5 %",
    "Val top-1 % center",
    "Wall time s",
)


def requested_variants(spec: str) -> list[str]:
    """Variant names from `config.ablate.variants`: 'all' or a comma list (order kept).

    Raises:
      UsageError: an unknown name, naming the valid ones.
    """
    if spec.strip() in ("", "all"):
        return list(VARIANTS)
    names = []
    for name in (n.strip() for n in spec.split(",")):
        if not name:
            continue
        if name not in VARIANTS:
            raise UsageError(
                f"config.ablate.variants: unknown variant {name!r}: valid variants: all, "
                + ", ".join(VARIANTS)
            )
        if name not in names:
            names.append(name)
    return names


def variant_config(base, variant: str):
    """The config a variant trains with: `base`'s data, seed and optimizer, the ablation
    budget (config.ablate.epochs, .steps_per_epoch) and the variant's model."""
    config = set_variant(base.copy_and_resolve_references(), variant)
    config.train.epochs = int(base.ablate.epochs)
    config.train.steps_per_epoch = int(base.ablate.steps_per_epoch)
    return config


def budget(base) -> dict:
    """What every variant shares (stored in table.json so tables never mix budgets)."""

    config = variant_config(base, "baseline")
    identity = workdirs.config_json(config)
    return {
        "epochs": config.train.epochs,
        "steps_per_epoch": train.steps_per_epoch(config),
        "batch_size": config.train.batch_size,
        "learning_rate": config.train.learning_rate,
        "seed": config.seed,
        "train_error_images": int(base.ablate.train_error_images),
        # Everything but the model (which the variants change) and the command-line sections.
        "config": {k: v for k, v in identity.items() if k not in ("model", "analysis", MODE)},
    }


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def check_reuse(base, out_dir: str, variants: list[str], overwrite: bool) -> dict:
    """Refuses, before any training, to mix budgets or configs.

    A variant workdir trained with another config (budget included) is refused unless
    `overwrite` (then it is retrained afresh); so is an existing table.json of another
    budget or variant list (then it is replaced).

    Returns:
      {variant: 'reuse' | 'train' | 'retrain'}.

    Raises:
      UsageError: naming the workdir and the differing config keys.
    """

    table = os.path.join(out_dir, "table.json")
    if os.path.exists(table) and not overwrite:
        old = _read_json(table)
        diff = workdirs.differences(old.get("budget", {}), budget(base))
        if old.get("variants") != variants:
            diff.append("variants")
        if diff:
            raise UsageError(
                f"{table} holds an ablation with another budget or variant list (differs in "
                f"{', '.join(diff[:5])}); use another --workdir, or --overwrite to replace it"
            )
    plan = {}
    for variant in variants:
        vdir = os.path.join(out_dir, variant)
        diff = workdirs.run_differences(vdir, variant_config(base, variant))
        if diff and not overwrite:
            raise UsageError(
                f"{vdir} was trained with another config (differs in "
                f"{', '.join(diff[:5])}{'...' if len(diff) > 5 else ''}); use another "
                "--workdir, or --overwrite to retrain it"
            )
        if diff:
            plan[variant] = "retrain"
        elif os.path.exists(os.path.join(vdir, RESULT_FILE)):
            plan[variant] = "reuse"
        else:
            plan[variant] = "train"
    return plan


def parameter_count(config) -> int:
    """Trainable + non-trainable parameters of the model `config.model` builds."""
    import keras

    count = model_lib.build_model(config.model).count_params()
    keras.utils.clear_session()
    return int(count)


def train_error(model, config, num_images: int = 0) -> dict[str, float]:
    """Top-1/top-5 error (%) of `model` on the training split's center crops.

    Args:
      num_images: score only the first this many images of the split (0 = all).
    """
    import numpy as np

    ds = inputs.build_inputs(config, config.data.train_split, None, "center")
    if num_images:
        ds = ds.unbatch().take(num_images).batch(config.train.eval_batch_size)
    logits, labels = [], []
    for x, y in ds:
        logits.append(model.predict_on_batch(x))
        labels.append(y.numpy())
    # Softmax keeps the order of the logits, so the top-k (and the errors) are the same.
    return evaluate.error_rates(np.concatenate(logits), np.concatenate(labels))


def _last_fit_metrics(workdir: str) -> dict:
    import csv

    with open(os.path.join(workdir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    return {
        "epochs_trained": len(rows),
        "fit_top1_error": 100 * (1 - float(last["top1"])),
        "fit_top5_error": 100 * (1 - float(last["top5"])),
    }


def train_variant(base, variant: str, vdir: str, strategy, retrain: bool) -> dict:
    """Trains (or resumes) one variant and scores it; writes `vdir/ablate.json`.

    Returns:
      The variant's table row as a dict.
    """
    import keras

    config = variant_config(base, variant)
    resumed = os.path.isdir(os.path.join(vdir, "backup")) and not retrain
    result_path = os.path.join(vdir, RESULT_FILE)
    if os.path.exists(result_path):
        os.remove(result_path)  # stale: this variant is being retrained
    start = time.time()
    # The trained model is dropped once fit returns; without this TensorFlow's gradient
    # registry would keep it (weights and optimizer slots) for the rest of the process:
    # zf_tf/core/memory.py.
    with memory.released_custom_gradients():
        train.train_and_evaluate(config, vdir, strategy, overwrite=retrain)
    if not workdirs.is_chief(strategy):
        return {}
    keras.utils.clear_session()
    model = workdirs.load_model(vdir)
    errors = train_error(model, config, int(base.ablate.train_error_images))
    ev = _read_json(os.path.join(vdir, "eval.json"))
    row = {
        "variant": variant,
        "description": VARIANTS[variant][0],
        "parameters": int(model.count_params()),
        "train_top1_error": errors["top1_error"],
        "train_top5_error": errors["top5_error"],
        "val_top1_error": ev["ten_crop"]["top1_error"],
        "val_top5_error": ev["ten_crop"]["top5_error"],
        "val_center_top1_error": ev["center_crop"]["top1_error"],
        "val_center_top5_error": ev["center_crop"]["top5_error"],
        "wall_s": round(time.time() - start, 1),
        "resumed": resumed,
        **_last_fit_metrics(vdir),
    }
    del model
    keras.utils.clear_session()
    outputs.save_text(result_path, json.dumps(row, indent=2))
    return row


def table_markdown(rows: list[dict], info: dict) -> str:
    """The Table 3-style markdown table (errors in %) with a budget line."""

    body = [
        [
            r["variant"],
            r["description"],
            f"{r['parameters']:,}",
            f"{r['train_top1_error']:.1f}",
            f"{r['train_top5_error']:.1f}",
            f"{r['val_top1_error']:.1f}",
            f"{r['val_top5_error']:.1f}",
            f"{r['val_center_top1_error']:.1f}",
            f"{r['wall_s']:.0f}",
        ]
        for r in rows
    ]
    b = info["budget"]
    caption = (
        f"Error % on {info['dataset']}: {b['epochs']} epochs x {b['steps_per_epoch']} steps of "
        f"batch {b['batch_size']}, learning rate {b['learning_rate']}, seed {b['seed']} for "
        "every variant. Train: final model, center crops of the training split (compare with "
        "'Val center'). Val: 10 crops averaged. Wall time: the training run that finished the "
        "variant, with its evaluation.\n\n"
    )
    return caption + outputs.markdown_table(COLUMNS, body)


def render(rows: list[dict], path: str, budget_line: str = "same budget"):
    """Horizontal bars of train and validation top-1 error per variant; returns the PNG
    as a uint8 array."""
    import numpy as np

    plt = outputs.pyplot()
    names = [r["variant"] for r in rows][::-1]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(names) + 1.4))
    bars = (
        ("train_top1_error", "train top-1 (center crop)"),
        ("val_center_top1_error", "val top-1 (center crop)"),
        ("val_top1_error", "val top-1 (10 crops)"),
    )
    for i, (key, label) in enumerate(bars):
        ax.barh(y + 0.27 * (1 - i), [r[key] for r in rows][::-1], 0.27, label=label)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("error %")
    ax.set_xlim(0, 100)
    ax.set_title(f"Architecture ablations (paper Table 3), {budget_line}", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.4, -0.09), ncol=3)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    image = outputs.save_figure(fig, path)
    plt.close(fig)
    return image


def run(base, workdir: str, strategy, overwrite: bool = False) -> list[dict]:
    """`--mode=ablate`: trains the requested variants and writes the table.

    Args:
      base: the command line's config; its `ablate` section picks variants and budget.
      workdir: the parent workdir; everything goes under `workdir/ablate/`.
      strategy: tf.distribute strategy every variant trains under.
      overwrite: retrain variants trained with another config and replace a table of
        another budget or variant list.

    Returns:
      The table rows (dicts), in the order of the requested variants.

    Raises:
      UsageError: unknown variant, a bad model field, or an existing ablation of another
        budget/config without `overwrite`.
    """

    variants = requested_variants(base.ablate.variants)
    out_dir = os.path.join(workdir, MODE)
    # Every variant must build (bad model fields fail now, not after hours of training).
    params = {}
    for variant in variants:
        try:
            params[variant] = parameter_count(variant_config(base, variant))
        except ValueError as e:
            raise UsageError(f"ablation variant {variant}: {str(e).splitlines()[0]}") from None
    plan = check_reuse(base, out_dir, variants, overwrite)
    info = {
        "dataset": f"{base.data.name} ({base.data.source}, {base.data.tfds_config})"
        if base.data.source == "embedded"
        else f"{base.data.name or base.data.folder} ({base.data.source})",
        "budget": budget(base),
        "variants": variants,
    }
    print(
        f"Ablation of {len(variants)} variant(s) in {out_dir}: "
        + ", ".join(f"{v} ({plan[v]})" for v in variants)
    )
    rows = []
    for n, variant in enumerate(variants, 1):
        vdir = os.path.join(out_dir, variant)
        if plan[variant] == "reuse":
            print(f"Ablation variant {n} of {len(variants)}: {variant} done, reused")
            rows.append(_read_json(os.path.join(vdir, RESULT_FILE)))
            continue
        print(
            f"Ablation variant {n} of {len(variants)}: training {variant} "
            f"({params[variant]:,} parameters)"
        )
        rows.append(train_variant(base, variant, vdir, strategy, plan[variant] == "retrain"))
    if not workdirs.is_chief(strategy):
        return rows
    os.makedirs(out_dir, exist_ok=True)
    table = json.dumps({**info, "rows": rows}, indent=2)
    outputs.save_text(os.path.join(out_dir, "table.json"), table)
    text = table_markdown(rows, info)
    outputs.save_text(os.path.join(out_dir, "table.md"), text)
    b = info["budget"]
    line = f"{b['epochs']} epochs x {b['steps_per_epoch']} steps each"
    image = render(rows, os.path.join(out_dir, "errors.png"), line)
    outputs.write_tensorboard(out_dir, "table", "ablate/top1_error", image)
    print(text)
    return rows
