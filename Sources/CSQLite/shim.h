#ifndef CIRCUIT_CSQLITE_SHIM_H
#define CIRCUIT_CSQLITE_SHIM_H
#include <sqlite3.h>
#endif
