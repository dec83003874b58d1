from clafuse.cli import main

main()
