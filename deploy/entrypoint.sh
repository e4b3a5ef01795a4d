#!/bin/sh
# Entry point of the gateway's container image.
#
# The Docker Engine resolves bind-mount sources on the HOST, not in this container. labgate
# bind-mounts its relay helper into users' containers, so the helper must exist at a path the
# host sees: copy it into /var/lib/labgate/bin, which compose.yaml shares with the host at the
# same path (as it does the homes). The config then says
#   [docker] relay_helper = "/var/lib/labgate/bin/labgate-relay"
set -eu
mkdir -p /var/lib/labgate/bin
cp /usr/local/lib/labgate/labgate-relay /var/lib/labgate/bin/labgate-relay.new
chmod 0755 /var/lib/labgate/bin/labgate-relay.new
mv /var/lib/labgate/bin/labgate-relay.new /var/lib/labgate/bin/labgate-relay
exec /usr/local/bin/labgate "$@"
