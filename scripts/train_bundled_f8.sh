#!/usr/bin/env bash
# The LLM-grade f=8 candidate (VQGAN family) and its seed-architecture baseline, exactly as trained; each command
# resumes where it stopped when run again (--resume once a checkpoint exists).
#   bash scripts/train_bundled_f8.sh vqgan      # VQGAN family, f=8, K=8192, l2-normalised 8-dim codes
#   bash scripts/train_bundled_f8.sh vqgan-fsq  # the same network, FSQ with levels 8 8 8 4 4 (K=8192)
#   bash scripts/train_bundled_f8.sh seed-fsq   # the seed architecture with that FSQ
#   bash scripts/train_bundled_f8.sh seed       # the seed architecture with vqtok's EMA recipe (restarts after
#                                               # 100 unused steps, no k-means) at f=8, K=8192
#   bash scripts/train_bundled_f8.sh seed-balanced  # ... and re-seeding codes used by < 0.05 vectors per step
#   bash scripts/train_bundled_f8.sh seed-recipe  # the seed architecture and the seed's recipe (EMA, no restarts)
#   bash scripts/train_bundled_f8.sh seed-entropy   # `seed` plus the codebook-usage (entropy) regulariser
#   bash scripts/train_bundled_f8.sh seed-gradient  # `seed` plus the gradient-matching reconstruction term
#   bash scripts/train_bundled_f8.sh seed-gradient-0.3  # ... at weight 0.3 instead of 0.1
#   bash scripts/train_bundled_f8.sh seed-entropy-gradient  # `seed` plus both
#   bash scripts/train_bundled_f8.sh seed-entropy-3e-4  # `seed-entropy` with the entropy term at weight 3e-4
#   bash scripts/train_bundled_f8.sh seed-entropy-sampled  # `seed-entropy` on 512 of each batch's 2,048 vectors
#   bash scripts/train_bundled_f8.sh seed-entropy-sampled-4k  # ... for 4,000 steps instead of 2,000 (the bundled f8)
#   bash scripts/train_bundled_f8.sh seed-resize-entropy-sampled  # `seed-entropy-sampled` with --upsample resize
#   bash scripts/train_bundled_f8.sh seed-bilinear-entropy-sampled  # `seed-entropy-sampled` with --upsample bilinear
#   bash scripts/train_bundled_f8.sh seed-bilinear-entropy-sampled-gradient-4k  # ... + the gradient term, 4,000 steps
#   bash scripts/train_bundled_f8.sh seed-entropy-sampled-8k  # ... for 8,000 steps
#   bash scripts/train_bundled_f8.sh seed-entropy-3e-4-sampled-4k  # the sampled term at weight 3e-4, 4,000 steps
#   bash scripts/train_bundled_f8.sh seed-entropy-sampled-gradient-4k  # `seed-entropy-sampled-4k` + the gradient term
#   bash scripts/train_bundled_f8.sh seed-entropy-sampled-gradient-window20-4k  # ... restarts after 20 unused steps
#   bash scripts/train_bundled_f8.sh seed-l2  # `seed` with LlamaGen's codes: l2-normalised, searched in 8 dimensions
#                                            # (--code-dim 8), k-means init, restarts after 20 unused steps
#   bash scripts/train_bundled_f8.sh seed-plain-l2  # `seed-l2` with the gradient codebook (--quantizer plain)
#   bash scripts/train_bundled_f8.sh seed-recipe-4k  # `seed-recipe` for 4,000 steps (the bundled f8's baseline)
#   bash scripts/train_bundled_f8.sh seed-k4096-entropy-sampled-4k  # `seed-entropy-sampled-4k` with 4,096 codes
#   bash scripts/train_bundled_f8.sh seed-k4096-entropy-4k  # ... with the term on the whole batch
#   bash scripts/train_bundled_f8.sh seed-k4096-entropy-gradient-4k  # `seed-k4096-entropy-4k` + the gradient term
#   bash scripts/train_bundled_f8.sh seed-k4096-entropy-gradient-window20-4k  # ... restarts after 20 unused steps
#   bash scripts/train_bundled_f8.sh seed-k4096-entropy-gradient-window20  # ... for 2,000 steps (beside the VQGAN run)
#   bash scripts/train_bundled_f8.sh seed-k4096-entropy-3e-4-gradient-4k  # ... with the entropy term at 3e-4
#   bash scripts/train_bundled_f8.sh seed-recipe-k4096-4k  # `seed-recipe-4k` with 4,096 codes (their baseline)
#   bash scripts/train_bundled_f8.sh vqgan-k4096-entropy-gradient-window20  # the VQGAN family (the `vqgan` network,
#                                               # 64-dim codes) with the bundled f8-k4096's recipe, 2,000 steps
# All with the same batch and data; 2,000 steps unless the name says otherwise.
# The new terms' weights, from the gradients they give on one batch of the trained `seed` model (runs/seed-f8):
# the entropy term (T = 0.1, batch weight 4) pulls on the latents about 10,000x as hard as the reconstruction
# and commitment losses per unit weight, so 1e-4 makes the two about equal (its value is then 8e-4 beside an
# MSE of 3e-3); the gradient term pulls on the pixels about 11x as hard as the MSE per unit weight, so 0.1
# makes those about equal. Batch weight 4, not MAGVIT-2's 1: in short trials with learned codebooks 1 left use
# where it was or lowered it, 4 raised it every time. 150-step trials (seed, f=8, K=1024): MSE within 4%.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/photos-v1}
[ -d "$DATA" ] || python scripts/build_photo_set.py --out "$DATA"
COMMON=(--data "$DATA" --downsample 8 --num-embeddings 8192 --steps 2000 --batch-size 32 --image-size 64
        --crops-per-image 64 --augment --eval-every 250 --checkpoint-every 100 --heldout-crops 256)
ENTROPY=(--entropy-weight 1e-4 --entropy-temperature 0.1 --entropy-batch-weight 4)
GRADIENT=(--gradient-loss-weight 0.1)
# The bundled f8-k4096's recipe, shared by its run and the two 2,000-step runs that compare the networks under it.
K4096_RECIPE=("${ENTROPY[@]}" "${GRADIENT[@]}" --num-embeddings 4096 --dead-code-window 20)
case "${1:-vqgan}" in
  vqgan) OUT=runs/vqgan-f8; ARGS=(--arch vqgan --num-hiddens 32 --channel-multipliers 1 2 2 4 --num-res-blocks 2
                                 --mid-attention --norm-groups 8 --z-channels 64 --embedding-dim 8 --l2-normalize
                                 --kmeans-init --dead-code-window 20 --name vqtok-vqgan-f8) ;;
  vqgan-fsq) OUT=runs/vqgan-fsq-f8; ARGS=(--arch vqgan --num-hiddens 32 --channel-multipliers 1 2 2 4
                                 --num-res-blocks 2 --mid-attention --norm-groups 8 --z-channels 64
                                 --quantizer fsq --fsq-levels 8 8 8 4 4 --embedding-dim 5 --name vqtok-vqgan-fsq-f8) ;;
  seed)  OUT=runs/seed-f8; ARGS=(--name vqtok-seed-f8-k8192) ;;
  seed-balanced) OUT=runs/seed-balanced-f8; ARGS=(--dead-code-threshold 0.05 --name vqtok-seed-f8-k8192-balanced) ;;
  seed-recipe) OUT=runs/seed-recipe-f8; ARGS=(--dead-code-window 0 --name vqtok-seed-recipe-f8-k8192) ;;
  seed-fsq) OUT=runs/seed-fsq-f8; ARGS=(--quantizer fsq --fsq-levels 8 8 8 4 4 --name vqtok-seed-fsq-f8) ;;
  seed-entropy) OUT=runs/seed-entropy-f8; ARGS=("${ENTROPY[@]}" --name vqtok-seed-f8-k8192-entropy) ;;
  seed-gradient) OUT=runs/seed-gradient-f8; ARGS=("${GRADIENT[@]}" --name vqtok-seed-f8-k8192-gradient) ;;
  seed-gradient-0.3) OUT=runs/seed-gradient03-f8; ARGS=(--gradient-loss-weight 0.3 --name vqtok-seed-f8-k8192-gradient03) ;;
  seed-entropy-gradient) OUT=runs/seed-entropy-gradient-f8
                         ARGS=("${ENTROPY[@]}" "${GRADIENT[@]}" --name vqtok-seed-f8-k8192-entropy-gradient) ;;
  seed-entropy-3e-4) OUT=runs/seed-entropy3e-4-f8
                     ARGS=(--entropy-weight 3e-4 --entropy-temperature 0.1 --entropy-batch-weight 4
                           --name vqtok-seed-f8-k8192-entropy3e-4) ;;
  seed-entropy-sampled) OUT=runs/seed-entropy-sampled-f8
                        ARGS=("${ENTROPY[@]}" --entropy-sample 512 --name vqtok-seed-f8-k8192-entropy-sampled) ;;
  seed-resize-entropy-sampled) OUT=runs/seed-resize-entropy-sampled-f8
                               ARGS=("${ENTROPY[@]}" --entropy-sample 512 --upsample resize
                                     --name vqtok-seed-f8-k8192-resize-entropy-sampled) ;;
  seed-entropy-sampled-4k) OUT=runs/seed-entropy-sampled-4k-f8
                           ARGS=("${ENTROPY[@]}" --entropy-sample 512 --steps 4000
                                 --name vqtok-seed-f8-k8192-entropy-sampled-4k) ;;
  seed-bilinear-entropy-sampled) OUT=runs/seed-bilinear-entropy-sampled-f8
                                 ARGS=("${ENTROPY[@]}" --entropy-sample 512 --upsample bilinear
                                       --name vqtok-seed-f8-k8192-bilinear-entropy-sampled) ;;
  seed-bilinear-entropy-sampled-gradient-4k) OUT=runs/seed-bilinear-entropy-sampled-gradient-4k-f8
                                             ARGS=("${ENTROPY[@]}" --entropy-sample 512 --upsample bilinear
                                                   "${GRADIENT[@]}" --steps 4000
                                                   --name vqtok-seed-f8-k8192-bilinear-entropy-sampled-gradient-4k) ;;
  seed-entropy-sampled-8k) OUT=runs/seed-entropy-sampled-8k-f8
                           ARGS=("${ENTROPY[@]}" --entropy-sample 512 --steps 8000
                                 --name vqtok-seed-f8-k8192-entropy-sampled-8k) ;;
  seed-entropy-3e-4-sampled-4k) OUT=runs/seed-entropy3e-4-sampled-4k-f8
                                ARGS=(--entropy-weight 3e-4 --entropy-temperature 0.1 --entropy-batch-weight 4
                                      --entropy-sample 512 --steps 4000
                                      --name vqtok-seed-f8-k8192-entropy3e-4-sampled-4k) ;;
  seed-entropy-sampled-gradient-4k) OUT=runs/seed-entropy-sampled-gradient-4k-f8
                                    ARGS=("${ENTROPY[@]}" --entropy-sample 512 "${GRADIENT[@]}" --steps 4000
                                          --name vqtok-seed-f8-k8192-entropy-sampled-gradient-4k) ;;
  seed-entropy-sampled-gradient-window20-4k) OUT=runs/seed-entropy-sampled-gradient-window20-4k-f8
                                             ARGS=("${ENTROPY[@]}" --entropy-sample 512 "${GRADIENT[@]}" --steps 4000
                                                   --dead-code-window 20
                                                   --name vqtok-seed-f8-k8192-entropy-sampled-gradient-window20-4k) ;;
  seed-l2) OUT=runs/seed-l2-f8; ARGS=(--l2-normalize --code-dim 8 --kmeans-init --dead-code-window 20
                                      --name vqtok-seed-f8-k8192-l2-code8) ;;
  seed-plain-l2) OUT=runs/seed-plain-l2-f8; ARGS=(--quantizer plain --l2-normalize --code-dim 8 --kmeans-init
                                                  --dead-code-window 20 --name vqtok-seed-f8-k8192-plain-l2-code8) ;;
  seed-recipe-4k) OUT=runs/seed-recipe-4k-f8
                  ARGS=(--dead-code-window 0 --steps 4000 --name vqtok-seed-recipe-f8-k8192-4k) ;;
  seed-k4096-entropy-sampled-4k) OUT=runs/seed-k4096-entropy-sampled-4k-f8
                                 ARGS=("${ENTROPY[@]}" --entropy-sample 512 --steps 4000 --num-embeddings 4096
                                       --name vqtok-seed-f8-k4096-entropy-sampled-4k) ;;
  seed-k4096-entropy-4k) OUT=runs/seed-k4096-entropy-4k-f8
                         ARGS=("${ENTROPY[@]}" --steps 4000 --num-embeddings 4096
                               --name vqtok-seed-f8-k4096-entropy-4k) ;;
  seed-k4096-entropy-gradient-4k) OUT=runs/seed-k4096-entropy-gradient-4k-f8
                                  ARGS=("${ENTROPY[@]}" "${GRADIENT[@]}" --steps 4000 --num-embeddings 4096
                                        --name vqtok-seed-f8-k4096-entropy-gradient-4k) ;;
  seed-k4096-entropy-gradient-window20-4k) OUT=runs/seed-k4096-entropy-gradient-window20-4k-f8
                                           ARGS=("${K4096_RECIPE[@]}" --steps 4000
                                                 --name vqtok-seed-f8-k4096-entropy-gradient-window20-4k) ;;
  seed-k4096-entropy-gradient-window20) OUT=runs/seed-k4096-entropy-gradient-window20-f8
                                        ARGS=("${K4096_RECIPE[@]}" --name vqtok-seed-f8-k4096-entropy-gradient-window20) ;;
  seed-k4096-entropy-3e-4-gradient-4k) OUT=runs/seed-k4096-entropy3e-4-gradient-4k-f8
                                       ARGS=(--entropy-weight 3e-4 --entropy-temperature 0.1 --entropy-batch-weight 4
                                             "${GRADIENT[@]}" --steps 4000 --num-embeddings 4096
                                             --name vqtok-seed-f8-k4096-entropy3e-4-gradient-4k) ;;
  seed-recipe-k4096-4k) OUT=runs/seed-recipe-k4096-4k-f8
                        ARGS=(--dead-code-window 0 --steps 4000 --num-embeddings 4096
                              --name vqtok-seed-recipe-f8-k4096-4k) ;;
  vqgan-k4096-entropy-gradient-window20) OUT=runs/vqgan-k4096-entropy-gradient-window20-f8
                                            ARGS=(--arch vqgan --num-hiddens 32 --channel-multipliers 1 2 2 4
                                                  --num-res-blocks 2 --mid-attention --norm-groups 8 --z-channels 64
                                                  "${K4096_RECIPE[@]}" --name vqtok-vqgan-f8-k4096-entropy-gradient-window20) ;;
  *) echo "usage: $0 vqgan|vqgan-fsq|seed|seed-balanced|seed-recipe|seed-fsq|seed-entropy|seed-gradient|seed-gradient-0.3|seed-entropy-gradient|seed-entropy-3e-4|seed-entropy-sampled|seed-entropy-sampled-4k|seed-resize-entropy-sampled|seed-bilinear-entropy-sampled|seed-bilinear-entropy-sampled-gradient-4k|seed-entropy-sampled-8k|seed-entropy-3e-4-sampled-4k|seed-entropy-sampled-gradient-4k|seed-entropy-sampled-gradient-window20-4k|seed-l2|seed-plain-l2|seed-recipe-4k|seed-k4096-entropy-sampled-4k|seed-k4096-entropy-4k|seed-k4096-entropy-gradient-4k|seed-k4096-entropy-gradient-window20-4k|seed-k4096-entropy-gradient-window20|seed-k4096-entropy-3e-4-gradient-4k|seed-recipe-k4096-4k|vqgan-k4096-entropy-gradient-window20" >&2
     exit 2 ;;
esac
RESUME=()
[ -f "$OUT/trainer_state.pt" ] && RESUME=(--resume)
exec vqtok train "${COMMON[@]}" "${ARGS[@]}" --out "$OUT" "${RESUME[@]}"
