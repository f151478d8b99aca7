"""files.py: the one way nanoTVR writes a file that must never be seen half-written (checkpoints, logs, caches,
pictures, manifests): into a temporary file beside the target, flushed to disk, renamed over the target, and
the folder flushed, so that a crash or a power loss leaves either the old file or the new one."""
import os


def atomic_write(path, write, suffix=""):
    """write(tmp_path) fills a temporary file, which then replaces `path` in one rename. suffix: the temporary
    file's extension, for writers that choose the format by it (cv2.imwrite). A failure removes the temporary
    file and leaves any earlier `path` untouched."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # the rename itself reaches the disk with the folder (POSIX; not possible on Windows)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data):
    """A plain write whose every error is raised (closing the file flushes it: a full disk shows there)."""
    with open(path, "wb") as f:
        f.write(data)
