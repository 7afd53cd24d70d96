#!/bin/bash
# The docs/operations.md walk-through, run for real.
set -u
BIN=${BIN:-target/debug/imprint-sync}
ADMIN=postgres://postgres@127.0.0.1:5432/postgres
psql -q "$ADMIN" -c "DROP DATABASE IF EXISTS imprint_walk WITH (FORCE)" 2>/dev/null; psql -q "$ADMIN" -c "CREATE DATABASE imprint_walk"
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/imprint_walk
export IMPRINT_SYNC__API__BASE_URL=http://127.0.0.1:18089/
export IMPRINT_SYNC__API__KEY=sk_walk_key
export IMPRINT_SYNC__ADMIN__LISTEN=127.0.0.1:0
export IMPRINT_SYNC__LOG__LEVEL=warn
$BIN migrate >/dev/null
$BIN sandbox --listen 127.0.0.1:18089 --api-key sk_walk_key 2>/dev/null &
SB=$!
sleep 1
curl -s -X PUT -H 'content-type: application/json' http://127.0.0.1:18089/_sandbox/faults \
  -d '{"not_found":["7C1D5E0A-3B2F-4E61-9A8C-5D4E3F2A1B01","7C1D5E0A-3B2F-4E61-9A8C-5D4E3F2A1B02"]}' >/dev/null
psql -q "$DATABASE_URL" <<'SQL'
INSERT INTO imprint_sync.customer_outbox (customer_id, email, phone, first_name, last_name, country)
VALUES
 ('2F6A9C1E-8B3D-4A57-9E21-0C4B7D8E9F10', 'ada@example.com', '+14155550100', 'Ada', 'Lovelace', 'USA'),
 ('2F6A9C1E-8B3D-4A57-9E21-0C4B7D8E9F11', 'alan@example.com', '+14155550101', 'Alan', 'Turing', 'USA'),
 ('7C1D5E0A-3B2F-4E61-9A8C-5D4E3F2A1B01', 'grace@example.com', '+14155550102', 'Grace', 'Hopper', 'USA'),
 ('7C1D5E0A-3B2F-4E61-9A8C-5D4E3F2A1B02', 'edsger@example.com', '+14155550103', 'Edsger', 'Dijkstra', 'USA'),
 ('9A0B1C2D-3E4F-4A5B-8C6D-7E8F9A0B1C2D', 'ken@example.com', '0123', 'Ken', 'Thompson', 'USA');
SQL
echo '$ imprint-sync run --once'; $BIN run --once 2>/dev/null; echo "(exit $?)"
echo; echo '$ imprint-sync status --check --max-failed 0 --max-oldest-pending 300'
$BIN status --check --max-failed 0 --max-oldest-pending 300; echo "(exit $?)"
echo; echo '$ imprint-sync failed'; $BIN failed
echo; echo '$ imprint-sync failed --code CUSTOMER_NOT_FOUND_ERROR --json'; $BIN failed --code CUSTOMER_NOT_FOUND_ERROR --json
echo; echo '$ imprint-sync history 7C1D5E0A-3B2F-4E61-9A8C-5D4E3F2A1B01'; $BIN history 7C1D5E0A-3B2F-4E61-9A8C-5D4E3F2A1B01
# The customers are created at Imprint: the 404s stop.
curl -s -X PUT -H 'content-type: application/json' http://127.0.0.1:18089/_sandbox/faults -d '{"not_found":[]}' >/dev/null
echo; echo '$ imprint-sync run --replay-failed --code CUSTOMER_NOT_FOUND_ERROR --dry-run'
$BIN run --replay-failed --code CUSTOMER_NOT_FOUND_ERROR --dry-run; echo "(exit $?)"
echo; echo '$ imprint-sync run --replay-failed --code CUSTOMER_NOT_FOUND_ERROR --once'
$BIN run --replay-failed --code CUSTOMER_NOT_FOUND_ERROR --once; echo "(exit $?)"
echo; echo '$ imprint-sync failed'; $BIN failed
kill $SB
psql -q "$ADMIN" -c 'DROP DATABASE imprint_walk WITH (FORCE)'
