#!/usr/bin/env bash
# The real-photos experiment end to end (README "Real photographs"): prepare Imagenette's
# shards once, train configs/imagenette.py from them, then the paper's figures from that
# workdir, copied into docs/figures/imagenette/. Every step resumes or skips what is done:
# rerun the same command after an interruption.
#
#   bash bench/imagenette.sh [IMAGENETTE_ROOT] [WORKDIR] [PREPARED_DIR]
#
# Defaults: ../shared/data/imagenette, runs/imagenette, runs/imagenette_prepared.
# Wall time on the 2-core CPU machine: about 1 minute to prepare, 55 minutes to train
# (70 epochs), about 10 minutes of figures, the AlexNet-style comparison (another
# training), then the transfer (BUILD.md has each step's time). Caltech-101 is read from
# the folder beside IMAGENETTE_ROOT (`caltech101/<class>/*.jpg`).
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER=${1:-../shared/data/imagenette}
WORKDIR=${2:-runs/imagenette}
PREPARED=${3:-runs/imagenette_prepared}
PY=${PY:-.venv/bin/python}
CONFIG=(--config=configs/imagenette.py "--config.data.folder=$FOLDER")
FROM_SHARDS=(--config.data.source=prepared "--config.data.prepared_dir=$PREPARED")
OUT=docs/figures/imagenette
mkdir -p "$OUT"

if [ ! -f "$PREPARED/prepared.json" ] || [ -f "$PREPARED/train.progress.json" ] \
    || [ -f "$PREPARED/val.progress.json" ]; then
    "$PY" main.py --mode=prepare "${CONFIG[@]}" "--config.data.prepared_dir=$PREPARED"
fi
"$PY" main.py --mode=train --strategy=mirrored "${CONFIG[@]}" "${FROM_SHARDS[@]}" \
    "--workdir=$WORKDIR"

# Analyses read the workdir's data and model sections, and the `analysis` section (the
# `val` split) from configs/imagenette.py. --overwrite: a rerun redraws the figures.
run() { "$PY" main.py "$@" "${CONFIG[@]}" "--workdir=$WORKDIR" --overwrite; }
for layer in conv1 conv2 conv3 conv4 conv5; do
    run --mode=deconv "--layer=$layer" --num_features=9
    cp "$WORKDIR/deconv/$layer/top9_val.png" "$OUT/deconv_${layer}_top9.png"
done
run --mode=evolution && cp "$WORKDIR/evolution/evolution.png" "$OUT/"
run --mode=invariance && cp "$WORKDIR/invariance/invariance.png" \
    "$WORKDIR/invariance/invariance_examples.png" "$OUT/"
run --mode=occlusion && cp "$WORKDIR/occlusion/occlusion.png" "$OUT/"
run --mode=sanity && cp "$WORKDIR/sanity/sanity.md" "$WORKDIR/sanity/sanity.png" "$OUT/"
run --mode=atlas
for layer in conv2 conv3 conv4 conv5; do  # each unit's optimized image
    run --mode=featvis "--layer=$layer" --num_features=9  # the units of the deconv figures
    cp "$WORKDIR/featvis/$layer/channel.png" "$OUT/featvis_${layer}.png"
done
for kind in negative=true diversity=4; do  # what most inhibits conv5 units; diverse sets
    run --mode=featvis --layer=conv5 --features=5,9,102 "--config.analysis.featvis.$kind"
done
cp "$WORKDIR/featvis/conv5/channel_negative.png" "$OUT/featvis_conv5_negative.png"
cp "$WORKDIR/featvis/conv5/channel_diverse4.png" "$OUT/featvis_conv5_diverse4.png"
# Screenshots of the atlas (needs chromium and chromedriver; skipped without them).
if command -v chromedriver > /dev/null; then
    "$PY" -m tests.browser "$WORKDIR/atlas" "$OUT" conv4 14
fi
# Fig. 6: the same recipe with the AlexNet-style layer 1 (11x11 stride 4), same budget.
"$PY" main.py --mode=train --strategy=mirrored "${CONFIG[@]}" "${FROM_SHARDS[@]}" \
    --config.model.layer1=alexnet "--workdir=${WORKDIR}_alexnet"
run --mode=filters "--compare=${WORKDIR}_alexnet" && cp "$WORKDIR/filters/filters.png" "$OUT/"
# Table 4 / Fig. 9: Caltech-101 from this model's features vs from scratch (resumable).
"$PY" main.py --mode=transfer --config=configs/transfer_caltech101.py:folder \
    "--config.transfer.data.folder=$(dirname "$FOLDER")/caltech101" "--workdir=$WORKDIR"
cp "$WORKDIR/transfer/caltech101/fc7.png" "$OUT/transfer_caltech101.png"
cp "$WORKDIR/transfer/caltech101/fc7.md" "$OUT/transfer_caltech101.md"
echo "Figures in $OUT; the atlas: $WORKDIR/atlas/index.html"
