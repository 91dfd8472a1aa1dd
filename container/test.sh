#!/usr/bin/env bash
# Build the dfrn image on a Debian base made here, then check it offline (--network none):
#   dfrn --version, a non-root user, CPU torch, no network, dfrn bids --help;
#   a tiny synthetic study from a mounted folder, whose predictions must equal the same study
#   run outside the container (this shell's python, with dfrn installed) to 1e-5 at 1 thread;
#   dfrn bids ... participant (dfrn prep) on one shared IXI scan with the image's template,
#   whose outputs must be on the template's grid;
#   every output written into the mounted folder owned by the caller.
# Any failed step exits non-zero. Run by .ci/run after the tests (its venv active); locally:
#   . .venv/bin/activate && DFRN_TEST_DATA=/work/shared/data container/test.sh
# Needs podman and runc (and debootstrap when the base image is missing), as root or rootless.
# Settings (environment):
#   DFRN_TEST_DATA      shared data (mni152/, atlas/, ixi/); default ../shared/data
#   DFRN_BASE_IMAGE     the base image (default localhost/dfrn-base:bookworm, made if missing)
#   DFRN_REBUILD_BASE   1: make the base again even if it exists
#   DEBIAN_MIRROR       debootstrap's mirror (default http://deb.debian.org/debian)
#   DFRN_PREP_TRANSFORM the prep check's --transform: affine (default; about 2 min on one
#                       thread) or syn (dfrn's default; about 6 min)
#   DFRN_KEEP_WORK      1: keep the work folder (printed) after the run
#   DFRN_PRUNE          0: keep untagged images of earlier builds (default: podman image prune)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "container: $*"; }
fail() { echo "container: FAILED: $*" >&2; exit 1; }
step_start=$SECONDS
step() { say "ok: $1 ($((SECONDS - step_start)) s)"; step_start=$SECONDS; }

data="${DFRN_TEST_DATA:-$(cd .. && pwd)/shared/data}"
base="${DFRN_BASE_IMAGE:-localhost/dfrn-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
transform="${DFRN_PREP_TRANSFORM:-affine}"
for f in mni152/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz \
         mni152/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz \
         atlas/tpl-MNI152NLin6Asym_res-01_atlas-AAL3v1_dseg.nii.gz \
         atlas/tpl-MNI152NLin6Asym_res-01_atlas-AAL3v1_dseg.tsv ixi/sub-IXI012_T1w.nii.gz; do
  [ -s "$data/$f" ] || fail "$data/$f not found (set DFRN_TEST_DATA)"
done
command -v podman >/dev/null || fail "podman not found (apt-get install podman runc)"
command -v runc >/dev/null || fail "runc not found (apt-get install runc)"
python -c 'import dfrn' 2>/dev/null || fail "this shell's python has no dfrn: activate its venv"
version="$(python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
image="localhost/dfrn:$version"

work="$(mktemp -d "${TMPDIR:-/var/tmp}/dfrn-container.XXXXXX")"
cleanup() { if [ "${DFRN_KEEP_WORK:-0}" = 1 ]; then say "work folder kept: $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

# ---- the base: a minimal Debian bookworm with python3, made with debootstrap ----------------
if [ "${DFRN_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$base"; then
  command -v debootstrap >/dev/null || fail "debootstrap not found (apt-get install debootstrap)"
  say "making the base image $base with debootstrap from $mirror"
  [ "$(id -u)" = 0 ] || fail "debootstrap needs root; make $base as root, or set DFRN_BASE_IMAGE"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap"; }
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/cache/apt/*.bin \
         "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" --numeric-owner -cf - . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$base" >"$work/import.log" 2>&1 \
    || { cat "$work/import.log" >&2; fail "podman import"; }
  rm -rf "$work/rootfs"
  step "base image $base"
else
  say "base image $base exists (DFRN_REBUILD_BASE=1 makes it again)"
fi

# ---- build: pip settings as a secret, the template and atlas as a build context ---------------
tf="$work/templateflow/tpl-MNI152NLin6Asym"
mkdir -p "$tf"
cp "$data"/mni152/tpl-MNI152NLin6Asym_res-01_{T1w,desc-brain_mask}.nii.gz "$data"/atlas/tpl-MNI152NLin6Asym_res-01_atlas-AAL3v1_dseg.{nii.gz,tsv} "$tf/"
pip_out="$(python container/pip_settings.py "$work/pip.conf")"
pipfiles="$(sed -n 's/^pipfiles=//p' <<<"$pip_out")"
pipcert="$(sed -n 's/^pipcert=//p' <<<"$pip_out")"
build=(podman build --isolation chroot --layers -f Containerfile -t "$image"
       --build-arg BASE="$base" --build-arg VERSION="$version" --build-arg REVISION="$revision"
       --build-arg TORCH_INDEX_URL= --secret id=pipconf,src="$work/pip.conf"
       --build-context tfdata="$work/templateflow")
[ -n "$pipfiles" ] && build+=(--build-context pipfiles="$pipfiles")
[ -n "$pipcert" ] && build+=(--secret id=pipcert,src="$pipcert")
say "building $image (pip's local files from ${pipfiles:-nowhere}, read-only during the build)"
t0=$SECONDS
"${build[@]}" . >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; fail "podman build"; }
build_s=$((SECONDS - t0))
# earlier builds' images that no tag uses any more (the layers of this one stay, for the next)
[ "${DFRN_PRUNE:-1}" = 1 ] && podman image prune -f >/dev/null
grep -E '^(\[[0-9]/[0-9]\] )?STEP|Using cache' "$work/build.log" | sed 's/^/container:   /' | cut -c1-150
size_b="$(podman image inspect --format '{{.Size}}' "$image")"
size_gb="$(awk -v b="$size_b" 'BEGIN { printf "%.2f", b / 1e9 }')"
say "build time ${build_s} s; image $image size ${size_gb} GB ($size_b bytes)"
podman image inspect --format '{{json .Labels}}' "$image" | sed 's/^/container: labels /'
label="$(podman image inspect --format '{{index .Labels "org.opencontainers.image.version"}}' "$image")"
[ "$label" = "$version" ] || fail "label org.opencontainers.image.version is '$label', not $version"
step_start=$SECONDS

# ---- runs, all without network ---------------------------------------------------------------
run=(podman --runtime runc run --rm --network none --ulimit nofile=20000:20000
     --ulimit nproc=1000:1000 -e OMP_NUM_THREADS=1)
got="$("${run[@]}" "$image" --version)"
[ "$got" = "dfrn $version" ] || fail "dfrn --version printed '$got', not 'dfrn $version'"
step "dfrn --version: $got"
uid="$("${run[@]}" --entrypoint id "$image" -u)"
[ "$uid" != 0 ] || fail "the image's default user is root"
step "default user uid $uid (non-root)"
"${run[@]}" --entrypoint python "$image" -c '
import socket, torch
assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
try:
    socket.create_connection(("pypi.org", 443), timeout=5)
except OSError as exc:
    print(f"torch {torch.__version__} (CPU); network: none ({type(exc).__name__})")
else:
    raise SystemExit("the container reached pypi.org with --network none")' \
  || fail "CPU torch / no network"
step "CPU torch and no network"
"${run[@]}" --entrypoint sh "$image" -c '
  for p in /pipfiles /etc/pip.conf /opt/dfrn/pip.conf /tmp/dfrn-src; do
    [ ! -e "$p" ] || { echo "$p is in the image" >&2; exit 1; }; done
  [ -z "$(ls -A /run/secrets 2>/dev/null)" ] || { echo "/run/secrets is not empty" >&2; exit 1; }
  [ -z "${PIP_CONFIG_FILE:-}${PIP_FIND_LINKS:-}${PIP_EXTRA_INDEX_URL:-}" ] \
    || { echo "pip settings in the environment" >&2; exit 1; }' \
  || fail "the build's pip settings or mount points are in the image"
step "no pip settings of the build in the image"
"${run[@]}" "$image" bids --help >"$work/bids_help.txt" || fail "dfrn bids --help"
grep -q participant "$work/bids_help.txt" || fail "dfrn bids --help does not mention participant"
step "dfrn bids --help"

# The caller who owns the output folders. As root (rootful podman), a non-root caller is
# simulated with uid 4321 and `-u 4321:4321` (podman refuses --userns=keep-id as root); as a
# user (rootless podman), --userns=keep-id maps that user into the container and -u runs dfrn
# as it (podman 4.3 keeps the image's USER under keep-id alone, which cannot write there).
if [ "$(id -u)" = 0 ]; then
  caller=4321
  as_caller=(-u "$caller:$caller")
else
  caller="$(id -u)"
  as_caller=(--userns=keep-id -u "$caller:$(id -g)")
fi
owned_dir() { mkdir -p "$1"; [ "$(id -u)" = 0 ] && chown "$caller:$caller" "$1"; return 0; }
check_owner() {
  local bad
  bad="$(find "$1" ! -uid "$caller" | head -3)"
  [ -z "$bad" ] || fail "files in $1 not owned by uid $caller: $bad"
}

# ---- a tiny study, inside and outside ----------------------------------------------------------
study="$work/study"
OMP_NUM_THREADS=1 python -c "
from dfrn.data.synth import make_synthetic_cohort
make_synthetic_cohort('$study', n_subjects=8, voxel_size=8.0, effect=0.4, radius=14.0, seed=3)"
cp container/study.toml "$study/"
chmod -R a+rX "$study"
t0=$SECONDS
OMP_NUM_THREADS=1 dfrn run "$study/study.toml" --out "$work/out_host" --no-progress \
  >"$work/host_run.log" 2>&1 || { tail -20 "$work/host_run.log" >&2; fail "the study outside"; }
say "the study outside: $((SECONDS - t0)) s"
owned_dir "$work/out_ctr"
t0=$SECONDS
"${run[@]}" --read-only "${as_caller[@]}" -v "$study:/data:ro" -v "$work/out_ctr:/out" "$image" \
  run /data/study.toml --out /out/study --no-progress >"$work/ctr_run.log" 2>&1 \
  || { tail -20 "$work/ctr_run.log" >&2; fail "the study in the container"; }
study_s=$((SECONDS - t0))
check_owner "$work/out_ctr"
python - "$work/out_host/cv/predictions.tsv" "$work/out_ctr/study/cv/predictions.tsv" \
  "$study/participants.tsv" <<'EOF' || fail "the study's predictions"
import sys
import numpy as np
import pandas as pd
host, ctr, cohort = (pd.read_csv(p, sep="\t", dtype={"participant_id": str}) for p in sys.argv[1:])
keys = ["participant_id", "repeat", "factor"]
for name, table in (("outside", host), ("container", ctr)):
    missing = {(s, f) for s in cohort.participant_id for f in ("anhedonia", "sleep")} - set(
        zip(table.participant_id, table.factor))
    if missing:
        sys.exit(f"the {name} run has no prediction for {sorted(missing)[:3]}")
both = host.merge(ctr, on=keys, suffixes=("_host", "_ctr"), validate="one_to_one")
if len(both) != len(host) or len(both) != len(ctr):
    sys.exit(f"{len(host)} predictions outside, {len(ctr)} inside, {len(both)} in common")
diff = float(np.max(np.abs(both.y_pred_host - both.y_pred_ctr)))
if not np.isfinite(both.y_pred_ctr).all() or diff > 1e-5:
    sys.exit(f"predictions differ by {diff:.3g} (> 1e-5)")
print(f"container: {len(both)} predictions ({both.participant_id.nunique()} subjects x "
      f"{both.factor.nunique()} factors) equal the outside run's: max |diff| {diff:.2g}")
EOF
step "the study in the container (${study_s} s; with the cohort and the outside run)"

# ---- dfrn prep (BIDS-App participant level) on one IXI scan ------------------------------------
bids="$work/bids"
mkdir -p "$bids/sub-IXI012/anat"
cp "$data/ixi/sub-IXI012_T1w.nii.gz" "$bids/sub-IXI012/anat/"
printf 'participant_id\tage\tsex\nsub-IXI012\t38.78\tM\n' >"$bids/participants.tsv"
printf '{"Name": "IXI, one subject", "BIDSVersion": "1.8.0"}\n' >"$bids/dataset_description.json"
chmod -R a+rX "$bids"
owned_dir "$work/out_prep"
t0=$SECONDS
"${run[@]}" --read-only "${as_caller[@]}" -v "$bids:/data:ro" -v "$work/out_prep:/out" "$image" \
  bids /data /out participant --participant-label IXI012 --transform "$transform" \
  --no-progress >"$work/prep.log" 2>&1 \
  || { tail -20 "$work/prep.log" >&2; fail "dfrn bids participant (prep) in the container"; }
prep_s=$((SECONDS - t0))
check_owner "$work/out_prep"
python - "$work/out_prep" "$data/mni152/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz" <<'EOF' \
  || fail "the prep outputs"
import json
import sys
from pathlib import Path
import nibabel as nib
import numpy as np
import pandas as pd
out, tpl = Path(sys.argv[1]), nib.load(sys.argv[2])
source = json.loads((out / "prep.json").read_text())
if source.get("template_source") != "templateflow-cache" or not source.get(
        "template", "").startswith("/opt/templateflow/"):
    sys.exit(f"prep.json: the template came from {source.get('template_source')} "
             f"{source.get('template')}, not the image's /opt/templateflow")
qc = pd.read_csv(out / "qc.tsv", sep="\t")
if qc.status.tolist() not in (["ok"], ["flagged"]):
    sys.exit(f"qc.tsv status {qc.status.tolist()}")
anat = out / "sub-IXI012" / "anat"
for suffix in ("desc-preproc_T1w", "desc-brain_mask", "label-GM_probseg",
               "label-GM_desc-modulated_probseg"):
    path = anat / f"sub-IXI012_space-MNI152NLin6Asym_res-1_{suffix}.nii.gz"
    if not path.is_file():
        sys.exit(f"{path.name} missing")
    img = nib.load(path)
    if img.shape[:3] != tpl.shape[:3] or not np.allclose(img.affine, tpl.affine, atol=1e-4):
        sys.exit(f"{path.name}: shape {img.shape}, affine {img.affine.tolist()} is off the "
                 f"template grid {tpl.shape}")
row = qc.iloc[0]
print(f"container: prep outputs on the template grid {tpl.shape[:3]} "
      f"(dice {row.get('dice', float('nan')):.3f}, corr {row.get('corr', float('nan')):.3f}, "
      f"status {row.status})")
EOF
step "dfrn bids participant (dfrn prep, --transform $transform) in the container (${prep_s} s)"
say "all checks passed: build ${build_s} s, image ${size_gb} GB, study ${study_s} s, prep ($transform) ${prep_s} s"
