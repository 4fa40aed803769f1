from dpo_lit.console import main

main()
