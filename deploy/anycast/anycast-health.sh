#!/bin/sh
# Announces the anycast address only while the regatta node beside it is ready: polls the
# node's /readyz and toggles the BIRD protocol that carries the anycast route (a static
# protocol exported over BGP, `anycast` in bird-eu.conf / bird-us.conf).
#
#   READYZ_URL   the node's readiness URL, e.g. http://10.99.0.1:5000/readyz (required)
#   BIRD_SOCKET  BIRD's control socket (default /run/bird/bird.ctl)
#   PROTOCOL     the BIRD protocol to enable/disable (default anycast)
#   INTERVAL     seconds between checks (default 0.2)
#   RISE         consecutive 200s before announcing (default 2)
#   FALL         consecutive failures before withdrawing (default 1: a node drain or a
#                SIGTERM makes /readyz answer 503 at once, and the route should follow)
#
# A node drain (`regatta admin node drain`), a drain file, a SIGTERM (the node answers 503
# for `server.shutdown_grace` while it finishes what it is serving) or a dead node all
# withdraw the route within one INTERVAL plus BGP's own few milliseconds. Stopping this
# script (SIGTERM/SIGINT) withdraws it too. Each change is logged with a timestamp.
set -u
: "${READYZ_URL:?set READYZ_URL to the node's /readyz}"
BIRD_SOCKET=${BIRD_SOCKET:-/run/bird/bird.ctl}
PROTOCOL=${PROTOCOL:-anycast}
INTERVAL=${INTERVAL:-0.2}
RISE=${RISE:-2}
FALL=${FALL:-1}

announced=no
good=0
bad=0
checks=0

log() {
  echo "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ) $*"
}

bird() {
  birdc -s "$BIRD_SOCKET" "$1" "$PROTOCOL" >/dev/null 2>&1
}

withdraw_and_exit() {
  bird disable
  log "stopped: $PROTOCOL withdrawn"
  exit 0
}
trap withdraw_and_exit TERM INT

bird disable
log "checking $READYZ_URL every ${INTERVAL}s (rise $RISE, fall $FALL); $PROTOCOL withdrawn"
while :; do
  if curl -fsS -o /dev/null --max-time 1 "$READYZ_URL" 2>/dev/null; then
    good=$((good + 1))
    bad=0
  else
    bad=$((bad + 1))
    good=0
  fi
  if [ "$announced" = no ] && [ "$good" -ge "$RISE" ]; then
    if bird enable; then
      announced=yes
      log "ready: $PROTOCOL announced"
    fi
  elif [ "$announced" = yes ] && [ "$bad" -ge "$FALL" ]; then
    if bird disable; then
      announced=no
      log "not ready: $PROTOCOL withdrawn"
    fi
  fi
  # Re-assert the state now and then: a BIRD restarted under us starts withdrawn.
  checks=$((checks + 1))
  if [ $((checks % 25)) -eq 0 ]; then
    if [ "$announced" = yes ]; then bird enable; else bird disable; fi
  fi
  sleep "$INTERVAL" &
  wait $!
done
