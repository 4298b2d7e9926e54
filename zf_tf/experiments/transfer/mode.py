"""`--mode=transfer` itself: the target's features (cached), then for every draw and every
N a new softmax on them and the from-scratch baseline on the same images, then the
tables, figure and JSON of the results.

Resumable: each finished (draw, N) is saved in `<layer>.progress.json` beside the outputs,
under the identity of the run (the feature caches' keys, which name the source checkpoint
and the target data, and the transfer settings); rerunning the same command after an
interruption skips what is done. The file goes away when the results are written.
"""

from __future__ import annotations

import json
import os
import time

import keras
import numpy as np
import tqdm

from zf_tf import outputs
from zf_tf.experiments.transfer import features, fits, images, metrics, report, sampling
from zf_tf.experiments.transfer.scratch import ScratchTrainer
from zf_tf.experiments.transfer.target import (
    MODE,
    Target,
    check_section,
    resolve_target,
    source_overlap_warning,
)
from zf_tf.training import workdirs


def _summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


def _target_features(workdir, model, layer, target: Target, batch_size):
    """(train features, test features or None, cache facts) of the target's splits."""
    data = target.data
    train, path, hit = features.cached_features(
        workdir, model, layer, target, data.train_split, batch_size
    )
    caches = {"train": {"path": path, "hit": hit}}
    test = None
    if not target.held_out:
        test, path, hit = features.cached_features(
            workdir, model, layer, target, data.test_split, batch_size
        )
        caches["test"] = {"path": path, "hit": hit}
    return train, test, caches


def _test_images(t, target: Target, train, test, orders, per_class, draw):
    """(test set, its split, positions in it) of one draw."""
    if target.held_out:
        positions = sampling.held_out(
            train["labels"], orders, max(per_class), t.test_per_class, t.seed, draw
        )
        return train, target.data.train_split, positions
    positions = sampling.cap_per_class(
        test["labels"], np.arange(len(test["labels"])), t.test_per_class, t.seed, draw
    )
    return test, target.data.test_split, positions


def _progress_identity(t, caches) -> dict:
    """What a saved (draw, N) result depends on: the features and the transfer settings."""
    settings = workdirs.config_json(t)
    settings.pop("batch_size", None)  # extraction batch: not a result's input
    return {"features": {k: os.path.basename(v["path"]) for k, v in caches.items()}, **settings}


def _load_progress(path: str, identity: dict) -> dict:
    """{"draw/N": result} saved by an interrupted run of the same identity, else {}."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = {}
    if saved.get("identity") != identity:
        print(f"{path}: from another source model or settings; starting over")
        return {}
    print(f"Resuming: {len(saved['done'])} (draw, N) fits already done, read from {path}")
    return saved["done"]


def run(config, workdir: str, model: keras.Model, overwrite: bool = False) -> dict:
    """Transfer from `model` (trained in `workdir`) to the target of `config.transfer`.

    Args:
      config: the source run's config with the command line's `transfer` section.
      workdir: the source workdir: outputs go to WORKDIR/transfer/<name>/.
      model: the source model (its checkpoint identifies the feature cache).
      overwrite: replace existing outputs.

    Returns:
      The results dict (also written as JSON), with 'paths' to the outputs.
    """
    target = resolve_target(config)
    t = config.transfer
    layer = t.feature_layer
    features.check_feature_layer(model, layer)
    source_overlap_warning(config, target)
    paths = outputs.reserve(
        workdir,
        os.path.join(MODE, t.name),
        [f"{layer}.{e}" for e in ("json", "md", "png")],
        overwrite,
    )
    per_class = [int(n) for n in t.per_class]
    timings = {}
    start = time.perf_counter()
    train, test, caches = _target_features(workdir, model, layer, target, t.batch_size)
    timings["features_s"] = time.perf_counter() - start
    sampling.check_counts(train["labels"], target.class_names, per_class, target.held_out)

    transfer = {n: [] for n in per_class}
    scratch = {n: [] for n in per_class}
    transfer_ap = {n: [] for n in per_class}
    scratch_ap = {n: [] for n in per_class}
    timings["softmax_s"] = timings["scratch_s"] = 0.0
    trainer = ScratchTrainer(config, target) if t.scratch.epochs else None
    progress_path = os.path.join(os.path.dirname(paths[f"{layer}.json"]), f"{layer}.progress.json")
    identity = _progress_identity(t, caches)
    done = _load_progress(progress_path, identity)
    test_sizes = []
    bar = tqdm.tqdm(total=t.draws * len(per_class), desc=f"transfer to {t.name}", unit="fit")
    for draw in range(t.draws):
        orders = sampling.class_orders(train["labels"], target.num_classes, t.seed, draw)
        test_set, test_split, test_pos = _test_images(
            t, target, train, test, orders, per_class, draw
        )
        test_sizes.append(len(test_pos))
        test_labels = test_set["labels"][test_pos]
        todo = [n for n in per_class if f"{draw}/{n}" not in done]
        if trainer and todo:
            # Every N's images are among the largest N's (nested draws): one pass each.
            pool = sampling.sample_per_class(orders, 0 if 0 in per_class else max(per_class))
            pool_images, _ = images.encoded_images(
                target, target.data.train_split, train["indices"][pool]
            )
            test_images, _ = images.encoded_images(
                target, test_split, test_set["indices"][test_pos]
            )
        for n in per_class:
            if n not in todo:
                saved = done[f"{draw}/{n}"]
                transfer[n].append(saved["transfer"])
                transfer_ap[n].append(saved["transfer_ap"])
                if trainer:
                    scratch[n].append(saved["scratch"])
                    scratch_ap[n].append(saved["scratch_ap"])
                bar.update()
                continue
            train_pos = sampling.sample_per_class(orders, n)
            tic = time.perf_counter()
            classify = fits.train_softmax(
                train["features"][train_pos],
                train["labels"][train_pos],
                target.num_classes,
                target.multi_label,
                int(t.softmax.steps),
                float(t.softmax.learning_rate),
                float(t.softmax.weight_decay),
            )
            result = metrics.evaluate_scores(
                classify(test_set["features"][test_pos]), test_labels, target.multi_label
            )
            timings["softmax_s"] += time.perf_counter() - tic
            transfer[n].append(result["metric"])
            transfer_ap[n].append(result["per_class"])
            if trainer:
                tic = time.perf_counter()
                scores = trainer.fit_predict(
                    pool_images[np.searchsorted(pool, train_pos)],
                    train["labels"][train_pos],
                    test_images,
                    seed=t.seed * 1000 + draw * 100 + per_class.index(n),
                )
                result = metrics.evaluate_scores(scores, test_labels, target.multi_label)
                timings["scratch_s"] += time.perf_counter() - tic
                scratch[n].append(result["metric"])
                scratch_ap[n].append(result["per_class"])
            done[f"{draw}/{n}"] = {
                "transfer": transfer[n][-1],
                "transfer_ap": transfer_ap[n][-1],
                "scratch": scratch[n][-1] if trainer else None,
                "scratch_ap": scratch_ap[n][-1] if trainer else None,
            }
            outputs.save_text(
                progress_path,
                json.dumps(report.json_safe({"identity": identity, "done": done})) + "\n",
            )
            bar.update()
            bar.set_postfix(draw=draw, n=n, transfer=f"{transfer[n][-1]:.1f}")
    bar.close()

    results = {
        "target": t.name,
        "source_workdir": os.path.abspath(workdir),
        "feature_layer": layer,
        "feature_dim": int(train["features"].shape[1]),
        "metric_name": "mean AP" if target.multi_label else "mean per-class accuracy",
        "class_names": target.class_names,
        "per_class": per_class,
        "draws": int(t.draws),
        "seed": int(t.seed),
        "held_out_test": target.held_out,
        "num_train_images": int(len(train["labels"])),
        "num_test_images": int(np.mean(test_sizes)),
        "all_per_class": float(len(train["labels"]) / target.num_classes),
        "transfer": {str(n): _summary(transfer[n]) for n in per_class},
        "scratch": {str(n): _summary(scratch[n]) for n in per_class} if t.scratch.epochs else {},
        "scratch_epochs": int(t.scratch.epochs),
        "cache": caches,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    if target.multi_label:
        n = per_class[-1]
        mean_ap = lambda aps: np.nanmean(np.asarray(aps, np.float64), axis=0)  # noqa: E731
        results["per_class_ap"] = {
            "per_class": n,
            "transfer": mean_ap(transfer_ap[n]).tolist(),
            "scratch": mean_ap(scratch_ap[n]).tolist() if t.scratch.epochs else None,
        }
    text = report.summary(results, workdir)
    outputs.save_text(paths[f"{layer}.md"], text)
    image = report.plot(results, paths[f"{layer}.png"])
    outputs.write_tensorboard(workdir, MODE, f"{t.name}/{layer}", image)
    results["paths"] = paths
    outputs.save_text(
        paths[f"{layer}.json"], json.dumps(report.json_safe(results), indent=2) + "\n"
    )
    if os.path.exists(progress_path):
        os.remove(progress_path)
    print(text)
    print(f"Transfer results in {os.path.dirname(paths[f'{layer}.md'])}")
    return results


def run_mode(config, workdir: str, overwrite: bool = False) -> dict:
    """`--mode=transfer` (cli.MODES): the workdir's trained model is the source.

    Args:
      config: the workdir's config with the command line's `transfer` section.
      overwrite: replace existing outputs.

    Returns:
      The results of `run`.
    """
    check_section(config)
    return run(config, workdir, workdirs.load_model(workdir), overwrite)
