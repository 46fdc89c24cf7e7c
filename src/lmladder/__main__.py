from lmladder.cli import main

raise SystemExit(main())
