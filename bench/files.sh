# shellcheck shell=bash
# File-transfer measures of bench/run (sourced by it; uses its helpers and variables):
#   F1 sftp upload and download of SIZE_MB MiB, F2 rsync -a of a tree of 10,000 small files.
# labgate serves a second user whose container runs the Debian lab image (labgate/debian:test,
# scripts/debian-image), so the image's own OpenSSH sftp-server and rsync answer. OpenSSH is
# measured twice on the same files and disk: sshd serving the host directly (its internal
# sftp, the host's rsync), and sshd + `docker exec -i` into that same container running the
# same sftp-server and rsync binaries (the comparison P4 makes for exec).

FILES_IMAGE=labgate/debian:test
FILES_USER=benchf$$
FILES_UC=labgate-$FILES_USER
FILES_N_SMALL=10000

# Appended to labgate's config before it starts: the files user gets the Debian image.
files_config() {
  cp "$T/id_ed25519.pub" "$T/lab/keys/$FILES_USER.pub"
  printf '\n[users.%s]\nimage = "%s"\n' "$FILES_USER" "$FILES_IMAGE"
}

# Appended to sshd's config: the host's OpenSSH sftp-server (the program the Debian image has).
files_sshd_config() {
  echo "Subsystem sftp /usr/lib/openssh/sftp-server"
}

# sftp/rsync take ssh's options but not -n.
files_ssh_opts() {
  local o
  FILES_OPTS=()
  for o in "${SSH_OPTS[@]}"; do [ "$o" = -n ] || FILES_OPTS+=("$o"); done
  FILES_OPTS+=(-o Ciphers="$CIPHER")
}

# Seconds one command takes (wall clock).
files_time() {
  local t0 t1
  t0=$(now_us)
  "$@" >/dev/null || return 1
  t1=$(now_us)
  echo "$t0 $t1" | awk '{print ($2 - $1) / 1e6}'
}

# sftp -b BATCH against labgate, sshd (host), or sshd + docker exec (container).
files_sftp() { # which batch
  local which=$1 batch=$2
  case "$which" in
    lab) timeout 600 sftp "${FILES_OPTS[@]}" -P "$LAB_PORT" -b "$batch" "$FILES_USER@127.0.0.1" ;;
    osh) timeout 600 sftp "${FILES_OPTS[@]}" -P "$SSHD_PORT" -b "$batch" root@127.0.0.1 ;;
    oshx) timeout 600 sftp "${FILES_OPTS[@]}" -P "$SSHD_PORT" -b "$batch" \
      -s "docker exec -i $FILES_UC /usr/lib/openssh/sftp-server" root@127.0.0.1 ;;
  esac
}

files_rsync() { # which
  local which=$1 e
  case "$which" in
    lab)
      e="ssh ${FILES_OPTS[*]} -p $LAB_PORT"
      timeout 600 rsync -a -e "$e" "$T/small/" "$FILES_USER@127.0.0.1:small/" ;;
    osh)
      e="ssh ${FILES_OPTS[*]} -p $SSHD_PORT"
      timeout 600 rsync -a -e "$e" "$T/small/" "root@127.0.0.1:$T/osh/small/" ;;
    oshx)
      e="ssh ${FILES_OPTS[*]} -p $SSHD_PORT"
      timeout 600 rsync -a -e "$e" --rsync-path="docker exec -i $FILES_UC rsync" \
        "$T/small/" "root@127.0.0.1:/root/small/" ;;
  esac
}

# Removes an earlier run's copy of the tree.
files_clear() { # which
  case "$1" in
    lab) rm -rf "$T/lab/home/$FILES_USER/small" ;;
    osh) rm -rf "$T/osh/small" ;;
    oshx) docker exec "$FILES_UC" rm -rf /root/small ;;
  esac
}

files_bench() { # [f1: sftp only]
  docker image inspect "$FILES_IMAGE" >/dev/null 2>&1 || scripts/debian-image debian ||
    die "cannot build $FILES_IMAGE"
  files_ssh_opts
  mkdir -p "$T/osh" "$T/dl"
  log "F: files user's container ($FILES_IMAGE)"
  timeout 120 ssh "${FILES_OPTS[@]}" -n -p "$LAB_PORT" "$FILES_USER@127.0.0.1" true ||
    die "F: login of the files user failed"
  docker exec "$FILES_UC" mkdir -p /root

  log "F1 sftp upload/download of $SIZE_MB MiB x$N_BULK"
  head -c "$BYTES" /dev/urandom >"$T/big"
  local src_sum which n got
  src_sum=$(sha256sum <"$T/big" | cut -d' ' -f1)
  printf 'put %s big\n' "$T/big" >"$T/put.batch"
  printf 'get big %s\n' "$T/dl/big" >"$T/get.batch"
  for which in lab osh oshx; do : >"$T/f1.up.$which"; : >"$T/f1.down.$which"; done
  # labgate's sftp starts in the user's home; the others get absolute paths.
  printf 'put %s %s/big\n' "$T/big" "$T/osh" >"$T/put.osh.batch"
  printf 'get %s/big %s\n' "$T/osh" "$T/dl/big" >"$T/get.osh.batch"
  printf 'put %s /root/big\n' "$T/big" >"$T/put.oshx.batch"
  printf 'get /root/big %s\n' "$T/dl/big" >"$T/get.oshx.batch"
  for n in $(seq 1 "$N_BULK"); do
    for which in lab osh oshx; do
      local put=$T/put.batch get=$T/get.batch
      [ "$which" = lab ] || { put=$T/put.$which.batch; get=$T/get.$which.batch; }
      files_time files_sftp "$which" "$put" >>"$T/f1.up.$which" || die "F1: $which upload failed"
      rm -f "$T/dl/big"
      files_time files_sftp "$which" "$get" >>"$T/f1.down.$which" || die "F1: $which download failed"
      got=$(stat -c %s "$T/dl/big")
      [ "$got" = "$BYTES" ] || die "F1: $which downloaded $got bytes of $BYTES"
      if [ "$n" = 1 ]; then
        [ "$(sha256sum <"$T/dl/big" | cut -d' ' -f1)" = "$src_sum" ] || die "F1: $which round trip differs"
      fi
      rm -f "$T/dl/big"
    done
  done
  [ "$(sha256sum <"$T/lab/home/$FILES_USER/big" | cut -d' ' -f1)" = "$src_sum" ] ||
    die "F1: labgate's stored copy differs"
  rm -f "$T/big" "$T/lab/home/$FILES_USER/big" "$T/osh/big"
  docker exec "$FILES_UC" rm -f /root/big

  [ "${1:-}" != f1 ] || return 0
  log "F2 rsync -a of $FILES_N_SMALL small files x$N_BULK"
  local d per=$((FILES_N_SMALL / 10))
  for d in $(seq 0 9); do
    mkdir -p "$T/small/d$d"
    # 1,000 files of 1..4 KiB each (split cuts one random stream; sizes vary by directory).
    head -c $((per * (1024 * (d % 4 + 1)))) /dev/urandom |
      split -b $((1024 * (d % 4 + 1))) -d -a 4 - "$T/small/d$d/f"
  done
  for which in lab osh oshx; do : >"$T/f2.$which"; done
  for _ in $(seq 1 "$N_BULK"); do
    for which in lab osh oshx; do
      files_clear "$which"
      files_time files_rsync "$which" >>"$T/f2.$which" || die "F2: $which rsync failed"
    done
  done
  n=$(find "$T/lab/home/$FILES_USER/small" -type f | wc -l)
  [ "$n" = "$FILES_N_SMALL" ] || die "F2: labgate's copy has $n files of $FILES_N_SMALL"
  diff -r "$T/small" "$T/lab/home/$FILES_USER/small" >/dev/null || die "F2: labgate's copy differs"
}

files_mbps() { awk -v b="$BYTES" -v s="$(m "$1")" 'BEGIN {printf "%.1f", b / 1e6 / s}'; }

files_report() { # [f1: sftp only]
  local ul uo ux dl dn dx rl ro rx
  ul=$(files_mbps f1.up.lab) uo=$(files_mbps f1.up.osh) ux=$(files_mbps f1.up.oshx)
  dl=$(files_mbps f1.down.lab) dn=$(files_mbps f1.down.osh) dx=$(files_mbps f1.down.oshx)
  row "F1 sftp upload ${SIZE_MB} MiB, MB/s" "$ul" "$uo" "$(ratio "$ul" "$uo")" \
    "higher is better; sshd + docker exec sftp-server: $ux MB/s (labgate $(ratio "$ul" "$ux")x)"
  row "F1 sftp download ${SIZE_MB} MiB, MB/s" "$dl" "$dn" "$(ratio "$dl" "$dn")" \
    "higher is better; sshd + docker exec sftp-server: $dx MB/s (labgate $(ratio "$dl" "$dx")x)"
  [ "${1:-}" != f1 ] || return 0
  rl=$(m f2.lab) ro=$(m f2.osh) rx=$(m f2.oshx)
  row "F2 rsync $FILES_N_SMALL small files, s" "$rl" "$ro" "$(ratio "$rl" "$ro")" \
    "lower is better; sshd + docker exec rsync: $rx s (labgate $(ratio "$rl" "$rx")x)"
}
