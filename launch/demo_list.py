"""Print the compressors the demo trains with: every registered one."""
from hvdcomp.registry import COMPRESSORS

if __name__ == "__main__":
    print(" ".join(COMPRESSORS))
