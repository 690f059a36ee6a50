"""The control channel's framing: one virtio-serial port carries typed, multiplexed
frames between the container side and the guest.

A frame is an 8-byte header (magic, type, channel, payload length) and the payload.
The decoder is fed whatever bytes arrived and returns whole frames, so partial reads
and several frames in one read are the normal case, not an edge case.
"""
import struct

from dkvm import lightjson
from dkvm.schema import ExecStart, Field, MemberStart, NetChange, Plan, Record, in_range

MAGIC = 0xD7
HEADER = struct.Struct("!BBHI")
MAX_PAYLOAD = 1 << 20

# frame types
HELLO = 1       # guest -> host: init is up
EXIT = 2        # guest -> host: {"status": N} the workload's exit code
EXIT_ACK = 3    # host -> guest: exit status received, safe to power off
SIGNAL = 4      # host -> guest: {"signal": N} for the workload
ERROR = 5       # guest -> host: {"message": "..."} a fatal error in the guest
RESIZE = 6      # host -> guest: {"rows": R, "cols": C} the terminal's new size
# `docker exec`: one channel (non-zero) per exec, from its relay to its guest process
EXEC_START = 7  # relay -> guest: {"args", "env", "cwd", "uid", "gid", ...} start it
STDIN = 8       # relay -> guest: bytes for the process's stdin; empty payload: EOF
STDOUT = 9      # guest -> relay: bytes the process wrote to stdout (or its terminal)
STDERR = 10     # guest -> relay: bytes the process wrote to stderr
EXEC_EXIT = 11  # guest -> relay: {"status": N} the process ended, all output sent
WINDOW = 12     # either way: {"bytes": N} the receiver consumed N data bytes: send more
CLOSE = 13      # relay side -> guest: the relay is gone; end the process
DNS = 14        # either way: a 2-byte tag, then a DNS query (to the host) or its answer
NET = 15        # host -> guest: {"wait_for": [MAC of a hot-plugged NIC], "steps": [step]}
                #   Docker changed the container's networks (container.net.follower,
                #   container.net.steps)
INIT = 16       # guest -> host: init is up and has its control port open: send the plan
PLAN = 17       # host -> guest: the plan (schema.Plan): nothing of it is in the export
HEARTBEAT = 18  # guest -> host: init's loop turns (every HEARTBEAT_INTERVAL): the VM is alive
HEARTBEAT_INTERVAL = 5
RELEASE = 19    # host -> guest: virtiofsd nears its descriptor limit (one per inode the
                #   guest knows): let go of the inodes nothing uses
# A pod's member (paths.POD_SOCKET): its relay (dkvm-pod-member) sends MEMBER_START on
# its channel with its export's directory and its mount namespace as descriptors
# (SCM_RIGHTS, in the same sendmsg); the sandbox's side serves the export with a
# virtiofsd of its own, hot-plugs it, fills in its tag and passes the frame on; the guest runs the member's process in the member's own root and
# namespaces, and the channel goes on as an exec's (STDIN, STDOUT, STDERR, WINDOW,
# RESIZE, CLOSE, EXEC_EXIT), plus SIGNAL on the channel: for the member's PID 1.
MEMBER_START = 20
TYPES = {HELLO, EXIT, EXIT_ACK, SIGNAL, ERROR, RESIZE, EXEC_START, STDIN, STDOUT, STDERR,
         EXEC_EXIT, WINDOW, CLOSE, DNS, NET, INIT, PLAN, HEARTBEAT, RELEASE, MEMBER_START}
# Flow control for exec streams: a sender may have this many data bytes unconsumed
# by the far end; data frames carry at most MAX_DATA bytes.
STREAM_WINDOW = 256 << 10
MAX_DATA = 64 << 10


DNS_TAG = struct.Struct("!H")     # a DNS frame's payload: this tag, then the DNS message
DNS_ANSWER_TIMEOUT = 5            # both sides give up on a query then (so does a resolver)


class Status(Record):
    """EXIT, EXEC_EXIT: an exit status as a shell shows it (128+N: killed by signal N)."""
    FIELDS = {"status": Field(int, 0, in_range(0, 255), required=True)}


class SignalNumber(Record):
    FIELDS = {"signal": Field(int, 0, in_range(1, 64), required=True)}


class Message(Record):
    FIELDS = {"message": Field(str, "", required=True)}


class WindowSize(Record):
    FIELDS = {"rows": Field(int, 0, in_range(0, 0xFFFF), required=True),
              "cols": Field(int, 0, in_range(0, 0xFFFF), required=True)}


class Credit(Record):
    """WINDOW: the receiver consumed this many data bytes: send more."""
    FIELDS = {"bytes": Field(int, 0, in_range(1, STREAM_WINDOW), required=True)}


# the payload each JSON frame type carries
PAYLOADS = {EXIT: Status, SIGNAL: SignalNumber, ERROR: Message, RESIZE: WindowSize,
            EXEC_START: ExecStart, EXEC_EXIT: Status, WINDOW: Credit, NET: NetChange,
            PLAN: Plan, MEMBER_START: MemberStart}


class ProtocolError(Exception):
    """Garbage on the channel. `frames` holds the whole frames decoded before it; the
    decoder has dropped its buffer (a reset) and can be fed again."""

    def __init__(self, message, frames=()):
        super().__init__(message)
        self.frames = list(frames)


class Frame:
    """One decoded frame. (A plain class: dataclasses costs a noticeable import in
    the guest under TCG.)"""
    __slots__ = ("type", "channel", "payload")

    def __init__(self, type, channel=0, payload=b""):
        self.type, self.channel, self.payload = type, channel, payload

    def __eq__(self, other):
        return isinstance(other, Frame) and (self.type, self.channel, self.payload) == (
            other.type, other.channel, other.payload)

    def __repr__(self):
        return f"Frame({self.type}, {self.channel}, {self.payload!r})"

    def record(self):
        """The payload as its type's record, checked: a ProtocolError if it is not one."""
        try:
            return PAYLOADS[self.type].from_dict(lightjson.loads(self.payload))
        except ValueError as err:     # bad JSON, or a SchemaError
            raise ProtocolError(f"frame type {self.type}: bad payload: {err}") from None


def encode(ftype, payload=b"", channel=0):
    """One frame; `payload` is bytes, a record, or a dict for the type's record."""
    if isinstance(payload, dict):
        payload = PAYLOADS[ftype].from_dict(payload)
    if isinstance(payload, Record):
        payload = payload.to_json().encode()
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, ftype, channel, len(payload)) + payload


class Decoder:
    def __init__(self):
        self._buf = bytearray()

    def feed(self, data):
        """Return the frames completed by `data`; raise ProtocolError on garbage."""
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER.size:
            magic, ftype, channel, length = HEADER.unpack_from(self._buf)
            if magic != MAGIC or ftype not in TYPES or length > MAX_PAYLOAD:
                self._buf.clear()
                raise ProtocolError(f"malformed frame header (magic {magic:#x}, type {ftype}, "
                                    f"length {length})", frames)
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append(Frame(ftype, channel, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return frames

    @property
    def pending(self):
        return len(self._buf)


def feed_tolerant(decoder, data, on_error):
    """Frames from `data`; garbage is reported through `on_error` and skipped."""
    try:
        return decoder.feed(data)
    except ProtocolError as err:
        on_error(str(err))
        return err.frames
