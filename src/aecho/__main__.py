from aecho.cli import main

main()
