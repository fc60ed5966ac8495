"""Study assembly: deciding when a study is complete, selecting its series, handing it to a worker."""
