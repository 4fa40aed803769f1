from dpo_lit.cli import main

main()
