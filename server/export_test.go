package server

// CheckEtcdLog lets the external tests cut a WAL and ask for the diagnosis.
var CheckEtcdLog = checkEtcdLog
