#!/usr/bin/env bash
# Install pvgate on a gateway: system user, virtualenv, config skeleton, systemd unit.
#
# Usage: sudo systemd/install.sh [--prefix DIR] [--offline BUNDLE] [--dry-run]
#
#   --prefix DIR  install root for the virtualenv (default /opt/pvgate -> /opt/pvgate/venv)
#   --offline B   install from a bundle made by systemd/bundle.sh (no network: pip --no-index)
#   --dry-run     print each action instead of doing it. Read-only checks still run, and
#                 the root check is skipped so the plan can be reviewed (and tested) as
#                 any user; a real run must be done as root.
#
# Environment: PYTHON  interpreter used to create the venv (default: python3).
#
# Safe to re-run for upgrades: the user, config and venv are reused, the package is
# reinstalled from this checkout, and an existing /etc/pvgate/site.yaml is never touched.
# The service is enabled only if `pvgate check` accepts the site config.

set -euo pipefail

readonly DEFAULT_PREFIX=/opt/pvgate
readonly SERVICE_USER=pvgate
readonly SERVICE_GROUP=pvgate
readonly SERIAL_GROUP=dialout
readonly CONF_DIR=/etc/pvgate
readonly SITE_CONF="${CONF_DIR}/site.yaml"
readonly STATE_DIR=/var/lib/pvgate
readonly UNIT_DST=/etc/systemd/system/pvgate.service

PREFIX="${DEFAULT_PREFIX}"
DRY_RUN=0
OFFLINE=""
PYTHON="${PYTHON:-python3}"

usage() {
    sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

note() {
    printf '==> %s\n' "$*"
}

# Every change to the system goes through run(), so --dry-run cannot miss one.
run() {
    if ((DRY_RUN)); then
        printf '[dry-run]'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

while (($#)); do
    case "$1" in
        --prefix)
            (($# >= 2)) || die "--prefix needs a directory"
            PREFIX="$2"
            shift 2
            ;;
        --prefix=*)
            PREFIX="${1#--prefix=}"
            shift
            ;;
        --dry-run)
            DRY_RUN=1
            shift
            ;;
        --offline)
            (($# >= 2)) || die "--offline needs the bundle directory made by systemd/bundle.sh"
            OFFLINE="$2"
            shift 2
            ;;
        --offline=*)
            OFFLINE="${1#--offline=}"
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac
done

[[ "${PREFIX}" == /* ]] || die "--prefix must be an absolute path (got '${PREFIX}')"
PREFIX="${PREFIX%/}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "${SCRIPT_DIR}")"
UNIT_SRC="${SCRIPT_DIR}/pvgate.service"
EXAMPLE_CONF="${REPO_ROOT}/config/examples/site.yaml"
VENV="${PREFIX}/venv"
PVGATE_BIN="${VENV}/bin/pvgate"

# The service user must be able to read the root-owned venv whatever root's umask is.
umask 022

# --- Preconditions -------------------------------------------------------------------

if ((DRY_RUN)); then
    note "dry run: nothing will be changed (root check skipped)"
elif ((EUID != 0)); then
    die "must be run as root (it creates a system user, /etc/pvgate and a systemd unit); try: sudo $0"
fi

[[ -f "${REPO_ROOT}/pyproject.toml" ]] || die "no pyproject.toml in ${REPO_ROOT}: run the script from a pvgate checkout"
[[ -f "${UNIT_SRC}" ]] || die "missing unit file ${UNIT_SRC}"

command -v "${PYTHON}" >/dev/null 2>&1 ||
    die "${PYTHON} not found: install Python 3.11 or newer (Debian: apt-get install python3 python3-venv)"
"${PYTHON}" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
    die "pvgate needs Python >= 3.11, ${PYTHON} is $("${PYTHON}" -c 'import platform; print(platform.python_version())')"
# Debian ships the venv module without ensurepip; `python3 -m venv` then fails half-way.
"${PYTHON}" -c 'import venv, ensurepip' >/dev/null 2>&1 ||
    die "the Python venv module is incomplete: install the Debian package python3-venv (apt-get install python3-venv)"
note "using $("${PYTHON}" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

CONSTRAINTS="${REPO_ROOT}/constraints.txt"
if [[ -n "${OFFLINE}" ]]; then
    [[ -d "${OFFLINE}" ]] || die "--offline ${OFFLINE}: no such directory; make it with systemd/bundle.sh"
    OFFLINE="$(cd "${OFFLINE}" && pwd)"
    compgen -G "${OFFLINE}/pvgate-*.whl" >/dev/null ||
        die "--offline ${OFFLINE}: no pvgate wheel in it; make the bundle with systemd/bundle.sh"
    [[ -f "${OFFLINE}/constraints.txt" ]] && CONSTRAINTS="${OFFLINE}/constraints.txt"
    if [[ -f "${OFFLINE}/TARGET" ]] && [[ "$(<"${OFFLINE}/TARGET")" != "linux/$(uname -m)" ]]; then
        die "bundle ${OFFLINE} is for $(<"${OFFLINE}/TARGET"), this machine is linux/$(uname -m): build one with --target linux/$(uname -m)"
    fi
fi
[[ -f "${CONSTRAINTS}" ]] || die "missing ${CONSTRAINTS}: the pinned versions pvgate is tested with"

# --- Service user ----------------------------------------------------------------------

if ! getent group "${SERIAL_GROUP}" >/dev/null; then
    note "creating group ${SERIAL_GROUP} (owner of the serial ports on Debian)"
    run groupadd --system "${SERIAL_GROUP}"
fi

if id -u "${SERVICE_USER}" >/dev/null 2>&1; then
    note "user ${SERVICE_USER} exists"
    if ! id -nG "${SERVICE_USER}" | tr ' ' '\n' | grep -qx "${SERIAL_GROUP}"; then
        note "adding ${SERVICE_USER} to ${SERIAL_GROUP}"
        run usermod --append --groups "${SERIAL_GROUP}" "${SERVICE_USER}"
    fi
else
    note "creating system user ${SERVICE_USER} (no login, member of ${SERIAL_GROUP})"
    run useradd --system --user-group --no-create-home \
        --home-dir "${STATE_DIR}" --shell /usr/sbin/nologin \
        --groups "${SERIAL_GROUP}" --comment "pvgate data logger" "${SERVICE_USER}"
fi

# --- Virtualenv and package ------------------------------------------------------------

if [[ -x "${VENV}/bin/python" ]]; then
    note "reusing virtualenv ${VENV}"
else
    note "creating virtualenv ${VENV}"
    run install -d -m 0755 "${PREFIX}"
    run "${PYTHON}" -m venv "${VENV}"
fi

# Non-editable: the service must not depend on this checkout staying in place.
# --upgrade reinstalls on re-runs so an upgrade takes effect; versions pinned by constraints.txt.
pip_install=("${VENV}/bin/python" -m pip install --no-cache-dir --disable-pip-version-check
    --upgrade --constraint "${CONSTRAINTS}")
if [[ -n "${OFFLINE}" ]]; then
    note "installing pvgate from the bundle ${OFFLINE} into ${VENV} (offline)"
    run "${pip_install[@]}" --no-index --find-links "${OFFLINE}" pvgate
else
    note "installing pvgate from ${REPO_ROOT} into ${VENV}"
    run "${pip_install[@]}" "${REPO_ROOT}"
fi

# --- Configuration ---------------------------------------------------------------------

# root-owned, group-readable by the service: it may hold MQTT credentials, and the
# service has no reason to rewrite its own configuration.
note "preparing ${CONF_DIR}"
run install -d -m 0750 -o root -g "${SERVICE_GROUP}" "${CONF_DIR}"

if [[ -e "${SITE_CONF}" ]]; then
    note "keeping existing ${SITE_CONF}"
elif [[ -f "${EXAMPLE_CONF}" ]]; then
    note "installing example config to ${SITE_CONF}: edit it for this site"
    run install -m 0640 -o root -g "${SERVICE_GROUP}" "${EXAMPLE_CONF}" "${SITE_CONF}"
else
    note "no ${EXAMPLE_CONF} in this checkout: write ${SITE_CONF} yourself"
fi

# --- systemd unit ----------------------------------------------------------------------

note "installing unit ${UNIT_DST}"
if [[ "${VENV}" == "${DEFAULT_PREFIX}/venv" ]]; then
    run install -m 0644 -o root -g root "${UNIT_SRC}" "${UNIT_DST}"
else
    # The unit hard-codes the default venv path; point ExecStart at the chosen prefix.
    note "rewriting ExecStart for prefix ${PREFIX}"
    if ((DRY_RUN)); then
        printf '[dry-run] sed %q %q > tmpfile && install -m 0644 -o root -g root tmpfile %q\n' \
            "s#${DEFAULT_PREFIX}/venv/#${VENV}/#g" "${UNIT_SRC}" "${UNIT_DST}"
    else
        tmp_unit="$(mktemp)"
        trap 'rm -f "${tmp_unit}"' EXIT
        sed "s#${DEFAULT_PREFIX}/venv/#${VENV}/#g" "${UNIT_SRC}" >"${tmp_unit}"
        install -m 0644 -o root -g root "${tmp_unit}" "${UNIT_DST}"
    fi
fi

# --- Validate before enabling ----------------------------------------------------------

check_cmd=("${PVGATE_BIN}" check -c "${SITE_CONF}")
# Run as the service user when possible so unreadable config files show up now,
# not as a crash loop after enabling.
if command -v runuser >/dev/null 2>&1 && id -u "${SERVICE_USER}" >/dev/null 2>&1; then
    check_cmd=(runuser -u "${SERVICE_USER}" -- "${check_cmd[@]}")
fi

if ((DRY_RUN)); then
    if [[ ! -f "${SITE_CONF}" && ! -f "${EXAMPLE_CONF}" ]]; then
        note "a real run would stop here: ${SITE_CONF} would not exist, so pvgate.service would not be enabled"
    fi
    note "validating ${SITE_CONF}"
    run "${check_cmd[@]}"
elif [[ ! -f "${SITE_CONF}" ]]; then
    die "not enabling pvgate.service: ${SITE_CONF} does not exist; write it, check it with '${PVGATE_BIN} check -c ${SITE_CONF}' and re-run this script"
else
    note "validating ${SITE_CONF}"
    if ! check_out="$("${check_cmd[@]}" 2>&1)"; then
        printf '%s\n' "${check_out}" >&2
        die "not enabling pvgate.service: '${PVGATE_BIN} check -c ${SITE_CONF}' failed (errors above); fix the config and re-run this script"
    fi
    [[ -z "${check_out}" ]] || printf '%s\n' "${check_out}"
fi

# --- Enable ----------------------------------------------------------------------------

if [[ -d /run/systemd/system ]]; then
    was_active=0
    systemctl is-active --quiet pvgate.service && was_active=1
    run systemctl daemon-reload
    run systemctl enable --now pvgate.service
    if ((was_active)); then
        # enable --now leaves a running instance alone; restart it onto the new code.
        run systemctl restart pvgate.service
    fi
    note "done: follow it with 'journalctl -u pvgate -f'"
else
    note "systemd is not running here; on the gateway run:"
    printf '    systemctl daemon-reload\n    systemctl enable --now pvgate.service\n'
fi
