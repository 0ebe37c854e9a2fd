from kosmos2_cli.cli import main

main()
