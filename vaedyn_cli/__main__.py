from vaedyn_cli.cli import main

main()
