"""The transfer results as Table 4/5-style markdown (Table 6-style AP per class for
multi-label targets), a Fig. 9-style plot, and strict JSON.
"""

from __future__ import annotations

import numpy as np

from zf_tf import outputs


def _cell(mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f}"


def _n_label(n: int) -> str:
    return "all" if n == 0 else str(n)


def results_table(results: dict) -> str:
    """Table 4/5-style markdown: one row per method, one column per images-per-class.

    Args:
      results: with 'per_class' [N...], 'metric_name', 'feature_layer', 'transfer' and
        optionally 'scratch': {str(N): {'mean', 'std'}}.
    """
    header = [f"{results['metric_name']} % (mean ± std over {results['draws']} draws)"]
    header += [f"{_n_label(n)}/class" for n in results["per_class"]]
    rows = []
    for key, name in (
        ("transfer", f"Pretrained ZFNet features ({results['feature_layer']}) + new softmax"),
        ("scratch", "Same architecture trained from scratch"),
    ):
        if results.get(key):
            rows.append([name] + [_cell(**_ms(results[key][str(n)])) for n in results["per_class"]])
    return outputs.markdown_table(header, rows)


def _ms(entry: dict) -> dict:
    return {"mean": entry["mean"], "std": entry["std"]}


def ap_table(class_names, transfer_ap, scratch_ap=None) -> str:
    """Table 6-style markdown: AP % per class (columns) for transfer (and scratch), mean last.

    Args:
      transfer_ap, scratch_ap: AP % per class (NaN: no positive test image, shown '-').
    """
    header = ["AP %"] + list(class_names) + ["mean"]

    def row(name, ap):
        cells = ["-" if np.isnan(a) else f"{a:.1f}" for a in ap]
        return [name] + cells + [f"{np.nanmean(ap):.1f}"]

    rows = [row("Pretrained features", transfer_ap)]
    if scratch_ap is not None:
        rows.append(row("From scratch", scratch_ap))
    return outputs.markdown_table(header, rows)


# The paper's Table 4 (Caltech-101, mean per-class accuracy %, from ImageNet's 1.3 million
# images), drawn beside a run's curves of the same target: {method: {N per class: %}}.
PAPER = {
    "caltech101": {"transfer": {15: 83.8, 30: 86.5}, "scratch": {15: 22.8, 30: 46.5}},
}


def plot(results: dict, path: str) -> np.ndarray:
    """Fig. 9-style plot: the metric against training images per class, transfer and from
    scratch, with one-standard-deviation error bars, and the paper's figures for the same
    target (`PAPER`) as open markers. Returns the PNG as uint8 (H, W, 3)."""
    plt = outputs.pyplot()
    per_class = results["per_class"]
    all_x = results.get("all_per_class", max(per_class) * 2)
    xs = [all_x if n == 0 else n for n in per_class]
    fig, ax = plt.subplots(figsize=(6, 4))
    paper = PAPER.get(results["target"], {})
    layer = results["feature_layer"]
    for key, label, paper_label, style, color in (
        (
            "transfer",
            f"this model's {layer} + softmax",
            "paper: ImageNet-pretrained fc7 + softmax",
            "o-",
            "tab:blue",
        ),
        ("scratch", "from scratch", "paper: from scratch", "s--", "tab:orange"),
    ):
        if not results.get(key):
            continue
        means = [results[key][str(n)]["mean"] for n in per_class]
        stds = [results[key][str(n)]["std"] for n in per_class]
        ax.errorbar(xs, means, yerr=stds, fmt=style, capsize=3, label=label, color=color)
        if key in paper:
            ns = sorted(paper[key])
            ax.plot(
                ns,
                [paper[key][n] for n in ns],
                style[0],
                mfc="none",
                ms=9,
                color=color,
                label=paper_label,
            )
    if results["metric_name"] == "mean per-class accuracy":
        ax.axhline(100 / len(results["class_names"]), color="gray", ls=":", label="chance")
    ax.set_xticks(xs, [_n_label(n) for n in per_class])
    ax.set_xlabel("Training images per class")
    ax.set_ylabel(f"{results['metric_name']} (%)")
    ax.set_title(f"Transfer to {results['target']} ({results['draws']} draws)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    image = outputs.save_figure(fig, path)
    plt.close(fig)
    return image


def json_safe(value):
    """NaN (a class without test positives) as null: strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def summary(results: dict, workdir: str) -> str:
    """The markdown of WORKDIR/transfer/<target>/<layer>.md (also printed): a line naming
    the source and the test images, the results table and, for multi-label targets, the
    AP per class at the largest N (`results['per_class_ap']`)."""
    text = (
        f"Transfer to {results['target']}: {results['metric_name']} %, "
        f"{results['feature_layer']} features of the model in {workdir}; "
        f"test: {results['num_test_images']} images.\n\n"
    )
    text += results_table(results)
    if "per_class_ap" in results:
        ap = results["per_class_ap"]
        text += (
            f"\nAP per class at {_n_label(ap['per_class'])} images per class (mean over draws):\n\n"
        )
        text += ap_table(results["class_names"], ap["transfer"], ap["scratch"])
    return text
