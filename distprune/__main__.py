from distprune.cli import entry, main

if __name__ == "__main__":
    entry(main)
