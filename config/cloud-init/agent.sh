#!/bin/sh
# trunkfarm: user data for an on-demand agent (provisioner = "ec2").
#
# The hub fills in the placeholders for each instance it starts, base64-encodes
# the result and passes it as the instance's user data; cloud-init runs it once,
# as root, at first boot. Any image with cloud-init and curl or wget will do:
# nothing needs to be prepared in it.
#
# The placeholders, each a NAME between double curly braces (only ever
# written that way where a value belongs: a comment would be filled in too):
#   AGENT_URL          pool.ec2.agent_url: where trunkfarm-agent is downloaded from
#   POOL               the pool's name
#   INSTANCE           the instance's name (also its EC2 Name tag)
#   LABELS             the pool's labels and pool-<name>, comma-separated
#   MAX_PARALLEL_JOBS  pool.max_parallel_jobs
#   ENROLLMENT         a single-use enrollment string (it expires soon after
#                      pool.missing_timeout)
#
# No long-lived secret is in here: the enrollment string is spent by the
# `enroll` below and is worthless afterwards (the instance metadata service
# keeps serving this user data to anything on the machine). The agent's own
# credential is made at enrollment and never leaves the instance.
# Use your own template with pool.ec2.user_data_template (same placeholders;
# it may also be a #cloud-config document).
set -eu

AGENT_URL='{{AGENT_URL}}'
POOL='{{POOL}}'
NAME='{{INSTANCE}}'
LABELS='{{LABELS}}'
JOBS='{{MAX_PARALLEL_JOBS}}'
# Given to `enroll` in its environment, never as an argument: arguments show
# in `ps` (/proc/<pid>/cmdline) to every user of the machine.
ENROLLMENT='{{ENROLLMENT}}'

# Where things go, and who runs the agent. cloud-init sets none of these
# variables; they let the script be tried outside an instance.
BIN=${TRUNKFARM_AGENT_BIN:-/usr/local/bin/trunkfarm-agent}
STATE=${TRUNKFARM_AGENT_STATE_DIR:-/var/lib/trunkfarm-agent}
LOG=${TRUNKFARM_AGENT_LOG:-/var/log/trunkfarm-agent.log}
USER_NAME=${TRUNKFARM_AGENT_USER:-trunkfarm}
SERVICE=${TRUNKFARM_AGENT_SERVICE:-auto} # auto, systemd or nohup

log() {
    echo "trunkfarm: $*" >&2
    logger -t trunkfarm -- "$*" 2>/dev/null || true
}

# 1. Download the agent (retrying: the network may still be coming up).
mkdir -p "$(dirname "$BIN")"
tmp="$BIN.download.$$"
tries=0
until
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --connect-timeout 20 --max-time 300 -o "$tmp" "$AGENT_URL"
    elif command -v wget >/dev/null 2>&1; then
        wget -q -T 60 -O "$tmp" "$AGENT_URL"
    else
        log "neither curl nor wget is installed: cannot download trunkfarm-agent"
        exit 1
    fi
do
    tries=$((tries + 1))
    if [ "$tries" -ge 10 ]; then
        log "cannot download trunkfarm-agent from $AGENT_URL (pool.ec2.agent_url)"
        rm -f "$tmp"
        exit 1
    fi
    sleep 6
done
chmod 0755 "$tmp"
mv -f "$tmp" "$BIN"

# 2. Jobs run as an unprivileged user, when the image can make one.
if ! id "$USER_NAME" >/dev/null 2>&1; then
    useradd --system --home-dir "$STATE" --shell /bin/sh "$USER_NAME" 2>/dev/null ||
        adduser -S -D -h "$STATE" -s /bin/sh "$USER_NAME" 2>/dev/null ||
        true
fi
if id "$USER_NAME" >/dev/null 2>&1; then RUN_AS=$USER_NAME; else RUN_AS=$(id -un); fi

# 3. Enroll (this spends the single-use enrollment string).
mkdir -p "$STATE"
chmod 0700 "$STATE"
TRUNKFARM_ENROLLMENT=$ENROLLMENT "$BIN" enroll --name "$NAME" --state-dir "$STATE"
unset ENROLLMENT
if [ "$RUN_AS" != "$(id -un)" ]; then
    chown -R "$RUN_AS" "$STATE"
fi

# 4. Run it: a systemd service where there is systemd, else in the background.
if [ "$SERVICE" = auto ]; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        SERVICE=systemd
    else
        SERVICE=nohup
    fi
fi
RUN="$BIN run --state-dir $STATE --name $NAME --labels $LABELS --max-parallel-jobs $JOBS"
if [ "$SERVICE" = systemd ]; then
    cat >/etc/systemd/system/trunkfarm-agent.service <<UNIT
[Unit]
Description=trunkfarm on-demand agent (pool $POOL)
After=network-online.target
Wants=network-online.target

[Service]
User=$RUN_AS
ExecStart=$RUN
# SIGTERM drains: no new job, running jobs finish.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=15min
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable --now trunkfarm-agent.service
else
    touch "$LOG"
    # The agent's pid goes to $STATE/agent.pid.
    cmd="nohup $RUN >>$LOG 2>&1 </dev/null & echo \$! >$STATE/agent.pid"
    if [ "$RUN_AS" = "$(id -un)" ]; then
        sh -c "$cmd"
    else
        chown "$RUN_AS" "$LOG"
        su -s /bin/sh -c "$cmd" "$RUN_AS"
    fi
fi
log "trunkfarm-agent enrolled as $NAME (pool $POOL) and started ($SERVICE, as $RUN_AS)"
