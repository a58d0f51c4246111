#!/usr/bin/env bash
# Build an offline bundle: pvgate and every runtime dependency as wheels for one gateway type,
# to be carried to a site without internet and installed with `install.sh --offline DIR`.
#
# Usage: systemd/bundle.sh --target linux/aarch64|linux/armv7l|linux/x86_64 [--python 3.11] DIR
#
#   --target T   the gateway's OS/machine (`uname -m` on it): Raspberry Pi 4/5 64-bit and
#                i.MX8 boards are aarch64, 32-bit Raspberry Pi OS and i.MX6 are armv7l
#   --python V   the gateway's Python version (default 3.11, Debian 12)
#
# Environment: PYTHON  interpreter that runs pip here (default: python3); needs internet.
#
# Versions come from constraints.txt. Wheels are downloaded for the target platform with
# --only-binary=:all:; PyYAML is built here as a pure-Python wheel (without libyaml, which
# pvgate does not use), so it installs on any target, armv7l included.

set -euo pipefail

TARGET=""
PYVER="3.11"
DEST=""
PYTHON="${PYTHON:-python3}"

die() {
    printf 'bundle.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,13s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

while (($#)); do
    case "$1" in
        --target)
            (($# >= 2)) || die "--target needs a value"
            TARGET="$2"
            shift 2
            ;;
        --target=*)
            TARGET="${1#--target=}"
            shift
            ;;
        --python)
            (($# >= 2)) || die "--python needs a version such as 3.11"
            PYVER="$2"
            shift 2
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*)
            usage >&2
            die "unknown option: $1"
            ;;
        *)
            [[ -z "${DEST}" ]] || die "only one output directory, got '${DEST}' and '$1'"
            DEST="$1"
            shift
            ;;
    esac
done

case "${TARGET}" in
    linux/aarch64 | linux/armv7l | linux/x86_64) ARCH="${TARGET#linux/}" ;;
    "") die "--target is required: linux/aarch64, linux/armv7l or linux/x86_64" ;;
    *) die "unknown target '${TARGET}': use linux/aarch64, linux/armv7l or linux/x86_64" ;;
esac
[[ -n "${DEST}" ]] || die "give the output directory"
[[ "${PYVER}" =~ ^3\.[0-9]+$ ]] || die "--python takes a version such as 3.11, got '${PYVER}'"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "${SCRIPT_DIR}")"
CONSTRAINTS="${REPO_ROOT}/constraints.txt"
[[ -f "${CONSTRAINTS}" ]] || die "missing ${CONSTRAINTS}"
ABI="cp${PYVER/./}"

mkdir -p "${DEST}"
DEST="$(cd "${DEST}" && pwd)"
pip=("${PYTHON}" -m pip --disable-pip-version-check)

printf '==> pvgate wheel\n'
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "${DEST}" "${REPO_ROOT}"

yaml_pin="$(grep -i '^pyyaml==' "${CONSTRAINTS}" || true)"
[[ -n "${yaml_pin}" ]] || die "no PyYAML pin in ${CONSTRAINTS}"
printf '==> %s as a pure-Python wheel (no libyaml)\n' "${yaml_pin}"
PYYAML_FORCE_LIBYAML=0 "${pip[@]}" wheel --quiet --no-deps --no-binary PyYAML \
    --wheel-dir "${DEST}" "${yaml_pin}"

printf '==> dependencies for %s, Python %s\n' "${TARGET}" "${PYVER}"
platforms=()
for plat in manylinux_2_28 manylinux_2_17 manylinux2014 linux; do
    platforms+=(--platform "${plat}_${ARCH}")
done
"${pip[@]}" download --quiet --only-binary=:all: "${platforms[@]}" \
    --python-version "${PYVER}" --implementation cp --abi "${ABI}" --abi abi3 --abi none \
    --find-links "${DEST}" --constraint "${CONSTRAINTS}" --dest "${DEST}" \
    "$(find "${DEST}" -maxdepth 1 -name 'pvgate-*.whl' | head -n 1)"

cp "${CONSTRAINTS}" "${DEST}/constraints.txt"
printf '%s\n' "${TARGET}" >"${DEST}/TARGET"
printf '==> %s: %s wheels for %s\n' "${DEST}" "$(find "${DEST}" -maxdepth 1 -name '*.whl' | wc -l)" "${TARGET}"
printf '    on the gateway: sudo systemd/install.sh --offline %s\n' "${DEST}"
