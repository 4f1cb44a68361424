"""The cluster key: 32 random bytes every process of the cluster shares, the
HMAC key of control messages (formats/messages.py).  A regular file, mode
0600, owned by the user the node runs as; never read through a symlink."""
from __future__ import annotations

import errno
import os
import stat

from ..errors import NFactorError

KEY_SIZE = 32
DEFAULT_KEY_PATH = "/var/lib/nfactor/cluster.key"


class ClusterKeyError(NFactorError):
    pass


class ClusterKey:
    @staticmethod
    def load(path: str = DEFAULT_KEY_PATH) -> bytes:
        """Read an existing key, refusing a symlink, a file of another owner,
        one others can read or write, or one of the wrong size."""
        try:
            # O_NOFOLLOW: a link planted at the key's name must not choose what we trust
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ClusterKeyError(f"cluster key {path} is a symlink; refusing to follow it "
                                      f"(put the key file itself there)") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ClusterKeyError(f"cluster key {path} is not a regular file")
            if st.st_uid != os.geteuid():
                raise ClusterKeyError(
                    f"cluster key {path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); "
                    f"fix: chown {os.geteuid()} {path}")
            if st.st_mode & 0o077:
                raise ClusterKeyError(
                    f"cluster key {path} is readable or writable by group/others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); fix: chmod 600 {path}")
            data = os.read(fd, KEY_SIZE + 1)
        finally:
            os.close(fd)
        if len(data) != KEY_SIZE:
            raise ClusterKeyError(
                f"cluster key {path} has {st.st_size} bytes, "
                f"expected {KEY_SIZE}; restore the cluster's key file there (or remove it to "
                f"generate a new one, which every process of the cluster must then share)")
        return data

    @staticmethod
    def load_or_create(path: str = DEFAULT_KEY_PATH) -> bytes:
        """The key at `path`, created (32 random bytes, mode 0600) if absent.

        The new key is written to a private temporary file (O_EXCL) and then
        hard-linked to `path`: link() fails if the name exists, so when two
        processes race exactly one wins, and the loser (and any reader) only
        ever sees a complete key file, never a half-written one.
        """
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
            os.chmod(parent, 0o700)  # makedirs' mode is filtered by the umask
        try:
            return ClusterKey.load(path)
        except FileNotFoundError:
            pass
        tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, os.urandom(KEY_SIZE))
            os.fsync(fd)
            os.close(fd)
            fd = -1
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race: use its key
        finally:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)
        return ClusterKey.load(path)
