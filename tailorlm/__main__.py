from tailorlm.cli import main, torchrun_rank

if torchrun_rank() is not None:
    # Under torchrun: its failure summary then shows the failing rank's exception, not only an exit code.
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)

raise SystemExit(main())
