#!/usr/bin/env bash
# The CIFAR-10 SimCLR / M-SimCLR / VICReg / M-VICReg recipes, as a user with a CPU would try them: each recipe as
# shipped except for a short budget (STEPS steps of BATCH images, two views each), then the fast linear probe and
# kNN on its encoder, and the same for the encoder's random initialisation (the baseline measured in the same run).
#
#   experiments/check_ssl_recipes.sh            # STEPS=200 BATCH=32 PROBE_TRAIN=10000 PROBE_TEST=2000
#
# Needs data/cifar10-mds (python -m magma_composer.data.convert, see yamls/cifar10/mae-vit-tiny.yaml). Writes
# runs/ssl-check/<recipe>/ and the evaluation records runs/ssl-check/<recipe>-{linear,knn}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-200}
BATCH=${BATCH:-32}
PROBE_TRAIN=${PROBE_TRAIN:-10000}
PROBE_TEST=${PROBE_TEST:-2000}
OUT=runs/ssl-check
mkdir -p "$OUT"

probe() {  # probe NAME ENCODER_ARGS...
    local name=$1
    shift
    for protocol in linear-fast knn; do
        recipe=yamls/eval/$protocol.yaml
        [ "$protocol" = linear-fast ] && tag=linear || tag=knn
        "$PY" -m magma_composer.evaluate "$protocol" "$recipe" "$@" \
            train_data.max_samples="$PROBE_TRAIN" test_data.max_samples="$PROBE_TEST" \
            output="$OUT/$name-$tag.json" progress_bar=false overwrite=true
    done
}

for method in simclr m-simclr vicreg m-vicreg; do
    recipe=yamls/cifar10/$method-vit-tiny.yaml
    run=$OUT/$method
    if [ ! -f "$run/checkpoints/latest-rank0.pt" ]; then
        "$PY" -m magma_composer.train "$recipe" run_name="ssl-check-$method" save_folder="$run/checkpoints" \
            max_duration="${STEPS}ba" save_interval="${STEPS}ba" eval_interval="${STEPS}ba" \
            train_data.batch_size="$BATCH" device_train_microbatch_size="$BATCH" train_data.num_workers=2 \
            eval_data.num_workers=1 eval_data.max_samples=1000 callbacks.knn_monitor=false autoresume=false \
            progress_bar=false
    fi
    probe "$method" encoder.path="$run/checkpoints/latest-rank0.pt"
done
# the baseline: the same ViT-T/4 freshly initialised
probe init encoder.path="$OUT/simclr/checkpoints/latest-rank0.pt" encoder.weights=random
