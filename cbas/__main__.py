from cbas.cli import main

main()
