#!/bin/sh
# The nodeagent container's entrypoint: lifts Docker's masks over /proc and /sys, then runs the
# command. runc mounts a fresh proc and sysfs for each instance inside its user namespace, and the
# kernel refuses those mounts while any of the container's own proc or sysfs is hidden under
# another mount (Docker masks /proc/kcore, /proc/keys, /sys/firmware... and remounts /proc/sys
# read-only). This is what `docker run --security-opt systempaths=unconfined` does, which compose
# cannot ask for; the container holds CAP_SYS_ADMIN anyway. The cgroup tree stays bound.
set -eu
awk '{print $5}' /proc/self/mountinfo | grep -E '^/(proc|sys)/' | grep -v '^/sys/fs/cgroup' | sort -r |
  while read -r point; do umount "$point"; done
exec "$@"
