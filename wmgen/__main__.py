from wmgen.cli import main

main()
