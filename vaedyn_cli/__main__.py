from vaedyn_cli.entry import main

main()
