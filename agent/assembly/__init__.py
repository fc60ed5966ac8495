"""Study assembly: when a study is complete, which series to use, handing it to a worker."""
