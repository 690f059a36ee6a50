"""A pod's volumes, each exported once (in a pod's sandbox; host.rewrite.with_pod_volumes
has each member hand over its directory volumes): members that share a volume (an
emptyDir, a configMap) share one virtiofs export of it, so the guest has one cache
of it and one member's write is the other's next read, as on the host. The same
volume is known by its directory's identity (device and inode) and whether it is
mounted read-only, whoever sends it.

Here only the bookkeeping: which tag each volume has, which members use it, which
plugs are awaited, which exports are no longer used; the supervisor plugs and
unplugs (member_exports)."""
import os

from dkvm.container.member_exports import volume_tag


class Volume:
    def __init__(self, tag):
        self.tag = tag
        self.users = set()          # the channels of the members that use it
        self.plugged = False        # its plug succeeded (until then members wait)


class PodVolumes:
    def __init__(self):
        self.by_key = {}            # (st_dev, st_ino, read-only) -> Volume
        self.made = 0               # for each export's tag: never one reused

    def claim(self, channel, fds):
        """The member on `channel` uses the volumes whose directories `fds` are (ours:
        each is closed here, or handed on). Returns (their tags, in order; [(tag, fd)]
        of the new ones, to plug; the tags not plugged yet)."""
        tags, new, waits = [], [], set()
        for fd in fds:
            info = os.fstat(fd)
            key = (info.st_dev, info.st_ino, bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY))
            volume = self.by_key.get(key)
            if volume is None:
                volume = self.by_key[key] = Volume(volume_tag(self.made))
                self.made += 1
                new.append((volume.tag, fd))
            else:
                os.close(fd)
            volume.users.add(channel)
            tags.append(volume.tag)
            if not volume.plugged:
                waits.add(volume.tag)
        return tags, new, waits

    def on_plugged(self, tag, error):
        """A volume's plug is done: the channels of the members that waited for it,
        and whether its export is to be unplugged now (nobody uses it any more)."""
        key, volume = next(((k, v) for k, v in self.by_key.items() if v.tag == tag),
                           (None, None))
        if volume is None:
            return [], False
        if error:
            del self.by_key[key]
            return sorted(volume.users), False
        volume.plugged = True
        if not volume.users:
            del self.by_key[key]
            return [], True
        return sorted(volume.users), False

    def release(self, channel):
        """The member on `channel` is gone (the guest let go of its volumes): the tags
        of the plugged exports nobody uses any more, to unplug. One whose plug is still
        on its way goes when that plug is done (on_plugged)."""
        unused = []
        for key, volume in list(self.by_key.items()):
            volume.users.discard(channel)
            if not volume.users and volume.plugged:
                del self.by_key[key]
                unused.append(volume.tag)
        return unused
