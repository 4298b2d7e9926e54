#!/usr/bin/env bash
# The real-photos experiment end to end (README "Real photographs"): prepare Imagenette's
# shards once, train configs/imagenette.py from them, then the paper's figures from that
# workdir, copied into docs/figures/imagenette/. Every step resumes or skips what is done:
# rerun the same command after an interruption.
#
#   bash bench/imagenette.sh [IMAGENETTE_ROOT] [WORKDIR] [PREPARED_DIR]
#
# Defaults: ../shared/data/imagenette, runs/imagenette, runs/imagenette_prepared.
# Wall time on the 2-core CPU machine: about 1 minute to prepare, 50-55 minutes to train
# (70 epochs), then the figures (BUILD.md has each step's time).
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
run --mode=filters && cp "$WORKDIR/filters/filters.png" "$OUT/"
run --mode=sanity && cp "$WORKDIR/sanity/sanity.md" "$WORKDIR/sanity/sanity.png" "$OUT/"
run --mode=atlas
echo "Figures in $OUT; the atlas: $WORKDIR/atlas/index.html"
