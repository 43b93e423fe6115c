"""Benchmarks against the peers (`imagine bench WHAT`): each module has add_arguments(parser), run(args), main()."""
