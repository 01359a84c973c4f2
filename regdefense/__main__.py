"""``python -m regdefense`` (and ``torchrun -m regdefense``) runs the CLI."""

from regdefense.cli import main

if __name__ == "__main__":
    main()
