// The definition behind Communicator::mpi_comm_handle() (communicator.h):
// the native MPI_Comm of an MPI-backed communicator. Include this only
// where an MPI_Comm is handed to another library (parallel HDF5 in
// checkpoint/); everything else talks through the Communicator interface.
#pragma once

#include <mpi.h>

namespace motley::parallel {

struct MpiCommHandle {
  MPI_Comm comm = MPI_COMM_NULL;  // owned by the communicator that returned the handle
};

}  // namespace motley::parallel
