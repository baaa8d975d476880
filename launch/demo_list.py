"""Print the compressors the demo trains with: every registered one that is implemented."""

from hvdcomp.registry import COMPRESSORS, compressor_class

if __name__ == "__main__":
    names = []
    for name in COMPRESSORS:
        try:
            compressor_class(name)
        except (ImportError, AttributeError):
            continue  # registered name whose module is not in this version
        names.append(name)
    print(" ".join(names))
