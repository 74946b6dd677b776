"""LSNs: unsigned 64-bit integers; the CLI also takes ``0x`` hex and Postgres ``X/Y`` form."""

from compactor.storage.errors import InvalidInput

LSN_MAX = (1 << 64) - 1


def parse_lsn(text: str) -> int:
    """Parse decimal, ``0x``-prefixed hex, or Postgres ``HI/LO`` (32-bit hex halves)."""
    raw = text.strip()
    try:
        if "/" in raw:
            hi, lo = raw.split("/")
            hi_v, lo_v = int(hi, 16), int(lo, 16)
            if not (0 <= hi_v <= 0xFFFFFFFF and 0 <= lo_v <= 0xFFFFFFFF):
                raise ValueError
            value = (hi_v << 32) | lo_v
        elif raw.lower().startswith("0x"):
            value = int(raw[2:], 16)
        else:
            if not raw.isdigit():
                raise ValueError
            value = int(raw, 10)
    except ValueError:
        raise InvalidInput(f"invalid LSN {text!r}: expected decimal, 0x hex or X/Y") from None
    return check_lsn(value)


def check_lsn(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= LSN_MAX:
        raise InvalidInput(f"invalid LSN {value!r}: must be an integer in [0, 2^64)")
    return value
