from fiddler.cli import main

raise SystemExit(main())
